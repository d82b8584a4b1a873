"""Prompt -> conditioning for FLUX.1 teachers, equal to diffusers' ``FluxPipeline.encode_prompt``.

FLUX reads two text encoders (diffusers ``FluxPipeline``, checked on 0.42.1):

* CLIP-L (``text_encoder``, a plain ``CLIPTextModel``): 77 tokens (``padding="max_length"``,
  truncation, ``max_length = tokenizer.model_max_length``); only its ``pooler_output`` is used,
  as ``pooled_projections`` [B, 768].
* T5 (``text_encoder_2``, ``T5EncoderModel``): ``max_sequence_length`` tokens (padding to that
  length, truncation, ``</s>`` appended), last hidden state, no attention mask:
  ``encoder_hidden_states`` [B, L, 4096]. Unlike SD3 there are no CLIP rows in the sequence.
* ``text_ids``: zeros [L, 3] (the text tokens' RoPE positions); they depend on L only, so they are
  not part of the conditioning: ``sidscale.families.flux.adapter`` builds them from the sequence length.

The unconditional branch (only used with true CFG, off by default for FLUX.1-dev) is E(""), the
empty prompt encoded like a prompt, as ``FluxPipeline`` encodes its default ``negative_prompt``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from sidscale.core.cond import Cond
from sidscale.errors import TeacherDirError
from sidscale.families.flux.config import MAX_SEQUENCE_LENGTH_LIMIT as FLUX_MAX_SEQUENCE_LENGTH_LIMIT
from sidscale.families.shared.diffusers_dir import check_teacher_dir

FLUX_TEXT_FOLDERS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
FLUX_REQUIRED_FOLDERS = ("transformer", "scheduler", "vae", *FLUX_TEXT_FOLDERS)


def check_flux_dir(path: Path, folders: Sequence[str] = FLUX_REQUIRED_FOLDERS) -> None:
    """Each of ``folders`` is present with its config and weights (``teacher.check_teacher_dir``'s
    rules); errors name the folder and the expected layout of a FluxPipeline directory."""
    check_teacher_dir(Path(path), "flux", tuple(folders))


def check_flux_max_sequence_length(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= FLUX_MAX_SEQUENCE_LENGTH_LIMIT:
        raise ValueError(f"FLUX max_sequence_length = {value!r}: expected an integer in "
                         f"1..{FLUX_MAX_SEQUENCE_LENGTH_LIMIT} (T5 tokens; FLUX.1-dev and SiD-DiT use 512)")
    return value


class FluxTokenize:
    """prompts -> LongTensor [B, C + L]: CLIP-L ids | T5 ids, concatenated on dim 1 (C = the CLIP
    tokenizer's ``model_max_length``, 77; L = ``max_sequence_length``). A separate object from the
    conditioner because the data loader calls it in its workers: it pickles without encoders."""

    def __init__(self, tokenizer, tokenizer_2, max_sequence_length: int = 512) -> None:
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.max_sequence_length = check_flux_max_sequence_length(max_sequence_length)
        self.clip_length = int(tokenizer.model_max_length)  # diffusers: pipeline.tokenizer_max_length

    @property
    def width(self) -> int:
        return self.clip_length + self.max_sequence_length

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            raise TypeError("FluxTokenize takes a sequence of prompts, not one string")
        prompts = list(prompts)
        clip = self.tokenizer(prompts, padding="max_length", max_length=self.clip_length, truncation=True,
                              return_tensors="pt").input_ids
        t5 = self.tokenizer_2(prompts, padding="max_length", max_length=self.max_sequence_length,
                              truncation=True, return_tensors="pt").input_ids
        return torch.cat([clip, t5], dim=1).long()

    def split(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, C + L] -> (CLIP-L ids, T5 ids)."""
        if input_ids.dim() != 2 or input_ids.shape[1] != self.width:
            raise ValueError(f"FLUX token ids must be [B, {self.width}] (CLIP-L {self.clip_length} | T5 "
                             f"{self.max_sequence_length}), got {tuple(input_ids.shape)}")
        return input_ids[:, :self.clip_length], input_ids[:, self.clip_length:]


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


class FluxConditioner(torch.nn.Module):
    """FLUX conditioning: ``{"encoder_hidden_states": [B, L, joint_attention_dim] (T5),
    "pooled_projections": [B, pooled_projection_dim] (CLIP-L pooler output)}`` in ``dtype``, equal
    to ``FluxPipeline.encode_prompt(prompt, max_sequence_length=L)``'s first two outputs.

    The encoders are frozen and run under no_grad: no gradient ever flows into the text.
    """

    def __init__(self, tokenizer, tokenizer_2, text_encoder: torch.nn.Module, text_encoder_2: torch.nn.Module,
                 joint_attention_dim: int | None = None, pooled_projection_dim: int | None = None,
                 max_sequence_length: int = 512, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        # NOTE: a width mismatch would only surface as a matmul shape error deep inside the
        # transformer; name the two configs that disagree instead.
        t5_width, clip_width = int(text_encoder_2.config.d_model), int(text_encoder.config.hidden_size)
        if joint_attention_dim is not None and t5_width != joint_attention_dim:
            raise ValueError(f"FluxConditioner: T5 d_model = {t5_width} != the transformer's joint_attention_dim "
                             f"= {joint_attention_dim} (the transformer reads T5 states)")
        if pooled_projection_dim is not None and clip_width != pooled_projection_dim:
            raise ValueError(f"FluxConditioner: CLIP-L hidden_size = {clip_width} != the transformer's "
                             f"pooled_projection_dim = {pooled_projection_dim} (it reads CLIP-L's pooled output)")
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.tokenize = FluxTokenize(tokenizer, tokenizer_2, max_sequence_length)
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.text_encoder_2 = text_encoder_2.requires_grad_(False).eval()
        self.max_sequence_length = self.tokenize.max_sequence_length
        self.dtype = dtype
        self._empty: Cond | None = None

    @torch.no_grad()
    def encode_ids(self, input_ids: torch.Tensor) -> Cond:
        ids_clip, ids_t5 = self.tokenize.split(input_ids)
        te1, te2 = self.text_encoder, self.text_encoder_2
        pooled = te1(ids_clip.to(_device(te1)), output_hidden_states=False).pooler_output
        hidden = te2(ids_t5.to(_device(te2)), output_hidden_states=False)[0].to(pooled.device)
        return {"encoder_hidden_states": hidden.to(self.dtype), "pooled_projections": pooled.to(self.dtype)}

    def encode(self, prompts: Sequence[str]) -> Cond:
        return self.encode_ids(self.tokenize(prompts))

    def empty(self, batch: int) -> Cond:
        """E("") for ``batch`` samples: encoded once at batch size 1, then an expanded view (one cached
        row keeps every rank and step on the same unconditional branch: see SD3Conditioner.empty)."""
        if self._empty is None or self._empty["pooled_projections"].device != _device(self.text_encoder):
            self._empty = self.encode([""])
        return {k: v.expand(batch, *v.shape[1:]) for k, v in self._empty.items()}


def load_flux_conditioner(path: Path, dtype: torch.dtype, device: torch.device | str, max_sequence_length: int = 512,
                          joint_attention_dim: int | None = None,
                          pooled_projection_dim: int | None = None) -> FluxConditioner:
    """The frozen text side of a local diffusers FLUX directory (``local_files_only``)."""
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    from sidscale.families.shared.pretrained import load_pretrained

    path = Path(path)
    max_sequence_length = check_flux_max_sequence_length(max_sequence_length)
    check_flux_dir(path, FLUX_TEXT_FOLDERS)

    def encoder(cls, sub: str) -> torch.nn.Module:
        return load_pretrained(cls, path / sub, dtype=dtype, local_files_only=True).to(device)

    tok1 = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    tok2 = T5TokenizerFast.from_pretrained(path / "tokenizer_2", local_files_only=True)
    te1, te2 = encoder(CLIPTextModel, "text_encoder"), encoder(T5EncoderModel, "text_encoder_2")
    try:
        return FluxConditioner(tok1, tok2, te1, te2, joint_attention_dim, pooled_projection_dim,
                               max_sequence_length=max_sequence_length, dtype=dtype)
    except ValueError as e:
        raise TeacherDirError(f"teacher.path {path}: {e}") from None
