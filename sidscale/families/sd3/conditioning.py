"""Prompt -> conditioning for SD3 / SD3.5 (MMDiT) teachers, equal to diffusers' ``encode_prompt``.

SD3 reads three text encoders (diffusers ``StableDiffusion3Pipeline``, checked on 0.42.1):

* CLIP-L (``text_encoder``) and CLIP-G (``text_encoder_2``), both ``CLIPTextModelWithProjection``,
  77 tokens each (``padding="max_length"``, truncation). Their **penultimate** hidden states are
  concatenated on the feature dim (dL + dG: 768 + 1280 = 2048 for the real models) and zero-padded
  on the feature dim up to the T5 width (4096); their pooled projections ``text_embeds`` are
  concatenated into ``pooled_projections`` [B, dL + dG].
* T5 (``text_encoder_3``, ``T5EncoderModel``): ``max_sequence_length`` tokens (padding to that
  length, truncation, ``</s>`` appended), last hidden state, no attention mask.

``encoder_hidden_states`` = cat([CLIP part (77 rows), T5 part (L rows)], dim=1) -> [B, 77 + L, joint].
Without T5 (``text_encoder_3=None``) diffusers uses zeros of shape [B, max_sequence_length,
transformer.config.joint_attention_dim] for the T5 part (NOT ``tokenizer_max_length`` = 77), so
the layout is the same with and without T5; this module does the same.

NOTE on the CLIP length: diffusers tokenizes BOTH CLIP tokenizers with ``max_length =
pipeline.tokenizer_max_length`` = ``tokenizer.model_max_length`` of CLIP-L's tokenizer (77);
``SD3Tokenize`` does the same.

The unconditional branch is E(""), the empty prompt encoded like a prompt: that is also what
``encode_prompt`` does for an absent negative prompt (SD3 has no ``force_zeros_for_empty_prompt``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from sidscale.core.cond import Cond
from sidscale.errors import TeacherDirError
from sidscale.families.shared.diffusers_dir import check_teacher_dir

SD3_MAX_SEQUENCE_LENGTH_LIMIT = 512  # diffusers' check_inputs rejects more (T5's trained length)


def SD3_REQUIRED_FOLDERS(t5: bool = True) -> tuple[str, ...]:  # noqa: N802 (a constant that depends on t5)
    """Folders an SD3 / SD3.5 teacher directory must contain; the T5 pair only when T5 is used."""
    folders = ("transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    return folders + (("text_encoder_3", "tokenizer_3") if t5 else ())


def check_sd3_dir(path: Path, t5: bool = True, folders: Sequence[str] | None = None) -> None:
    """Each of ``folders`` (default: all of ``SD3_REQUIRED_FOLDERS(t5)``) is present with its config
    and weights (``teacher.check_teacher_dir``'s rules); errors name the folder and the expected layout."""
    kind = "sd3" if t5 else "sd3 (without T5: teacher.t5 false)"
    check_teacher_dir(Path(path), kind, tuple(SD3_REQUIRED_FOLDERS(t5) if folders is None else folders))


def check_max_sequence_length(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= SD3_MAX_SEQUENCE_LENGTH_LIMIT:
        raise ValueError(f"SD3 max_sequence_length = {value!r}: expected an integer in "
                         f"1..{SD3_MAX_SEQUENCE_LENGTH_LIMIT} (T5 tokens; SiD-DiT uses 77, diffusers' default is 256)")
    return value


class SD3Tokenize:
    """prompts -> LongTensor [B, C + C + L]: CLIP-L ids | CLIP-G ids | T5 ids, concatenated on dim 1
    (C = CLIP-L tokenizer's ``model_max_length``, 77; L = ``max_sequence_length``).

    Without a T5 tokenizer the last L columns are zeros (T5's pad id), so the layout, and the
    width of a batch, does not depend on whether T5 is used. A separate object from the
    conditioner because the data loader calls it in its workers: it pickles without encoders.
    """

    def __init__(self, tokenizer, tokenizer_2, tokenizer_3=None, max_sequence_length: int = 77) -> None:
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizer, tokenizer_2, tokenizer_3
        self.max_sequence_length = check_max_sequence_length(max_sequence_length)
        # diffusers: pipeline.tokenizer_max_length (CLIP-L's) for BOTH CLIP tokenizers
        self.clip_length = int(tokenizer.model_max_length)

    @property
    def width(self) -> int:
        return 2 * self.clip_length + self.max_sequence_length

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            raise TypeError("SD3Tokenize takes a sequence of prompts, not one string")
        prompts = list(prompts)
        clip = [tok(prompts, padding="max_length", max_length=self.clip_length, truncation=True,
                    return_tensors="pt").input_ids for tok in (self.tokenizer, self.tokenizer_2)]
        if self.tokenizer_3 is None:
            t5 = torch.zeros(len(prompts), self.max_sequence_length, dtype=torch.long)
        else:
            t5 = self.tokenizer_3(prompts, padding="max_length", max_length=self.max_sequence_length,
                                  truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
        return torch.cat([*clip, t5], dim=1).long()

    def split(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, C + C + L] -> (CLIP-L ids, CLIP-G ids, T5 ids)."""
        if input_ids.dim() != 2 or input_ids.shape[1] != self.width:
            raise ValueError(f"SD3 token ids must be [B, {self.width}] (CLIP-L {self.clip_length} | CLIP-G "
                             f"{self.clip_length} | T5 {self.max_sequence_length}), got {tuple(input_ids.shape)}")
        c = self.clip_length
        return input_ids[:, :c], input_ids[:, c:2 * c], input_ids[:, 2 * c:]


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _width(encoder: torch.nn.Module, key: str) -> int:
    return int(getattr(encoder.config, key))


class SD3Conditioner(torch.nn.Module):
    """SD3 / SD3.5 conditioning: ``{"encoder_hidden_states": [B, 77 + L, joint_attention_dim],
    "pooled_projections": [B, dL + dG]}`` in ``dtype``, equal to ``StableDiffusion3Pipeline.encode_prompt``
    with ``max_sequence_length = L`` (module docstring).

    ``text_encoder_3=None`` (T5 off, as diffusers allows): the T5 rows are zeros. The encoders are
    frozen and run under no_grad: no gradient ever flows into the text.
    """

    def __init__(self, tokenizer, tokenizer_2, tokenizer_3, text_encoder: torch.nn.Module,
                 text_encoder_2: torch.nn.Module, text_encoder_3: torch.nn.Module | None, joint_attention_dim: int,
                 max_sequence_length: int = 77, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if (tokenizer_3 is None) != (text_encoder_3 is None):
            raise ValueError("SD3Conditioner: tokenizer_3 and text_encoder_3 must both be given (T5 on) or both "
                             "be None (T5 off)")
        clip_width = _width(text_encoder, "hidden_size") + _width(text_encoder_2, "hidden_size")
        # NOTE: diffusers pads the CLIP states with F.pad(x, (0, joint - clip_width)); a negative
        # amount would silently CROP CLIP-G's features. Real SD3 has 2048 <= 4096; refuse the rest.
        if clip_width > joint_attention_dim:
            raise ValueError(f"SD3Conditioner: CLIP-L + CLIP-G hidden sizes = {clip_width} exceed "
                             f"joint_attention_dim = {joint_attention_dim}; the CLIP states are zero-padded up "
                             "to the joint width, which must be at least their sum")
        if text_encoder_3 is not None and _width(text_encoder_3, "d_model") != joint_attention_dim:
            raise ValueError(f"SD3Conditioner: T5 d_model = {_width(text_encoder_3, 'd_model')} != "
                             f"joint_attention_dim = {joint_attention_dim} (the transformer reads T5 states)")
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizer, tokenizer_2, tokenizer_3
        self.tokenize = SD3Tokenize(tokenizer, tokenizer_2, tokenizer_3, max_sequence_length)
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.text_encoder_2 = text_encoder_2.requires_grad_(False).eval()
        self.text_encoder_3 = None if text_encoder_3 is None else text_encoder_3.requires_grad_(False).eval()
        self.joint_attention_dim = int(joint_attention_dim)
        self.max_sequence_length = self.tokenize.max_sequence_length
        self.dtype = dtype
        self._empty: Cond | None = None

    @property
    def t5(self) -> bool:
        return self.text_encoder_3 is not None

    @torch.no_grad()
    def encode_ids(self, input_ids: torch.Tensor) -> Cond:
        ids_l, ids_g, ids_t5 = self.tokenize.split(input_ids)
        te1, te2 = self.text_encoder, self.text_encoder_2
        out1 = te1(ids_l.to(_device(te1)), output_hidden_states=True)
        out2 = te2(ids_g.to(_device(te2)), output_hidden_states=True)
        device = out1.text_embeds.device
        # penultimate layers (diffusers' default clip_skip=None), concatenated on the feature dim
        clip = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2].to(device)], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, self.joint_attention_dim - clip.shape[-1]))
        if self.text_encoder_3 is None:
            t5 = torch.zeros(ids_t5.shape[0], self.max_sequence_length, self.joint_attention_dim,
                             dtype=clip.dtype, device=device)
        else:
            t5 = self.text_encoder_3(ids_t5.to(_device(self.text_encoder_3)))[0].to(device)
        hidden = torch.cat([clip, t5.to(clip.dtype)], dim=-2)
        pooled = torch.cat([out1.text_embeds, out2.text_embeds.to(device)], dim=-1)
        return {"encoder_hidden_states": hidden.to(self.dtype), "pooled_projections": pooled.to(self.dtype)}

    def encode(self, prompts: Sequence[str]) -> Cond:
        return self.encode_ids(self.tokenize(prompts))

    def empty(self, batch: int) -> Cond:
        """E("") for ``batch`` samples: encoded once at batch size 1, then an expanded view.

        NOTE: equal to diffusers' negative embeddings for a batch of 1; for a batch of B the
        pipeline encodes B copies of "" at once, and CPU/GPU kernels may round that batch
        differently in the last bit (seen: 3e-8). One cached row keeps every rank and step on the
        same unconditional branch whatever the batch size.
        """
        if self._empty is None or self._empty["pooled_projections"].device != _device(self.text_encoder):
            self._empty = self.encode([""])
        return {k: v.expand(batch, *v.shape[1:]) for k, v in self._empty.items()}


def joint_attention_dim_from_dir(path: Path) -> int:
    """``joint_attention_dim`` of ``transformer/config.json`` (the T5 width the MMDiT reads)."""
    cfg_path = Path(path) / "transformer" / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise TeacherDirError(f"teacher transformer {cfg_path.parent}: missing config.json") from None
    except json.JSONDecodeError as e:
        raise TeacherDirError(f"teacher transformer config {cfg_path}: not valid JSON ({e})") from None
    value = cfg.get("joint_attention_dim") if isinstance(cfg, dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TeacherDirError(f"teacher transformer config {cfg_path}: joint_attention_dim = {value!r}, expected a "
                              "positive integer (an SD3Transformer2DModel config)")
    return value


def load_sd3_conditioner(path: Path, dtype: torch.dtype, device: torch.device | str, t5: bool = True,
                         max_sequence_length: int = 77) -> SD3Conditioner:
    """The frozen text side of a local diffusers SD3 / SD3.5 directory (``local_files_only``).

    ``t5=False``: ``text_encoder_3/`` is never loaded (about 9 GB in bf16 for T5-XXL) and neither it
    nor ``tokenizer_3/`` need exist; the T5 rows are zeros, as in diffusers with
    ``text_encoder_3=None``. ``joint_attention_dim`` comes from ``transformer/config.json``.
    """
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from sidscale.families.shared.pretrained import load_pretrained

    path = Path(path)
    max_sequence_length = check_max_sequence_length(max_sequence_length)
    text = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    check_sd3_dir(path, t5, folders=text + (("text_encoder_3", "tokenizer_3") if t5 else ()))
    joint = joint_attention_dim_from_dir(path)

    def encoder(cls, sub: str) -> torch.nn.Module:
        return load_pretrained(cls, path / sub, dtype=dtype, local_files_only=True).to(device)

    tok1 = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    tok2 = CLIPTokenizer.from_pretrained(path / "tokenizer_2", local_files_only=True)
    te1 = encoder(CLIPTextModelWithProjection, "text_encoder")
    te2 = encoder(CLIPTextModelWithProjection, "text_encoder_2")
    tok3 = te3 = None
    if t5:
        from transformers import T5EncoderModel, T5TokenizerFast

        tok3 = T5TokenizerFast.from_pretrained(path / "tokenizer_3", local_files_only=True)
        te3 = encoder(T5EncoderModel, "text_encoder_3")
    try:
        return SD3Conditioner(tok1, tok2, tok3, te1, te2, te3, joint_attention_dim=joint,
                              max_sequence_length=max_sequence_length, dtype=dtype)
    except ValueError as e:
        raise TeacherDirError(f"teacher.path {path}: {e}") from None
