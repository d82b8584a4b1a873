"""CLIP prompt encoding shared by every family (CLIP-L for all; SDXL dual + pooled + time ids).

A conditioning is a plain ``dict[str, Tensor]`` with batch-first tensors:
- ``encoder_hidden_states`` [B, 77, D] for every teacher;
- SDXL also ``text_embeds`` [B, 1280] (pooled, encoder 2) and ``time_ids`` [B, 6].
Keeping it a dict of tensors lets the method concatenate [uncond; cond] without knowing which
teacher it has.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from sidscale.core.cond import Cond


def unet_kwargs(cond: Cond) -> dict:
    """Keyword arguments of ``UNet2DConditionModel.forward`` for this conditioning."""
    kwargs: dict = {"encoder_hidden_states": cond["encoder_hidden_states"]}
    if "text_embeds" in cond:
        kwargs["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
    return kwargs


class ClipTokenize:
    """prompts -> token ids, padded to max length and truncated: ``[B, 77]`` for one tokenizer,
    ``[B, n, 77]`` (stacked) for n tokenizers (SDXL: n = 2).

    A separate object, not a conditioner method, because the data loader calls it inside its
    workers: it must pickle without dragging the text encoders along.
    """

    def __init__(self, *tokenizers) -> None:
        if not tokenizers:
            raise ValueError("ClipTokenize needs at least one tokenizer")
        self.tokenizers = tokenizers

    def _one(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        return tokenizer(prompts, padding="max_length", max_length=int(tokenizer.model_max_length),
                         truncation=True, return_tensors="pt").input_ids

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        prompts = list(prompts)
        ids = [self._one(tok, prompts) for tok in self.tokenizers]
        return ids[0] if len(ids) == 1 else torch.stack(ids, dim=1)


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


class ClipConditioner(torch.nn.Module):
    """SD1.5 / SD2.1 conditioning: CLIP ``last_hidden_state``, padded to max length, truncated.

    The empty-prompt conditioning (the unconditional branch) is computed once and reused.
    The text encoder is frozen; encoding runs under no_grad because no gradient ever flows
    into the text (the generator's gradient goes through the UNets, not the prompts).
    """

    def __init__(self, tokenizer, text_encoder: torch.nn.Module, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.tokenizer = tokenizer
        self.tokenize = ClipTokenize(tokenizer)
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.dtype = dtype
        self._empty: Cond | None = None

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @torch.no_grad()
    def encode_ids(self, input_ids: torch.Tensor) -> Cond:
        hidden = self.text_encoder(input_ids.to(_device(self.text_encoder))).last_hidden_state
        return {"encoder_hidden_states": hidden.to(self.dtype)}

    def encode(self, prompts: Sequence[str]) -> Cond:
        return self.encode_ids(self.tokenize(prompts))

    def empty(self, batch: int) -> Cond:
        if self._empty is None:
            self._empty = self.encode([""])
        return {k: v.expand(batch, *v.shape[1:]) for k, v in self._empty.items()}


def sdxl_time_ids(resolution: int | tuple[int, int]) -> tuple[int, int, int, int, int, int]:
    """SDXL's micro-conditioning: (original_h, original_w, crop_top, crop_left, target_h, target_w).

    Original size = target size = the training resolution and crop (0, 0), as diffusers'
    pipeline does by default: "an uncropped image of this size".
    """
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    return (h, w, 0, 0, h, w)


class SdxlConditioner(ClipConditioner):
    """SDXL conditioning: both encoders' penultimate hidden states concatenated on the feature
    dim (768 + 1280 = 2048), encoder 2's pooled projection ``text_embeds`` [B, 1280], and the
    six ``time_ids``.

    The unconditional branch is E(""), the empty prompt encoded exactly like a prompt (method
    page). NOTE: diffusers' StableDiffusionXLPipeline instead uses all-zero embeddings for an
    absent negative prompt when ``force_zeros_for_empty_prompt`` is set (SDXL-base ships it
    true); sidscale deliberately follows SiD-LSG (docs/method.md 2), so the teacher's guided score here
    differs from the pipeline's default CFG sampling.
    """

    def __init__(self, tokenizer, tokenizer_2, text_encoder: torch.nn.Module, text_encoder_2: torch.nn.Module,
                 resolution: int | tuple[int, int], dtype: torch.dtype = torch.float32):
        super().__init__(tokenizer, text_encoder, dtype)
        self.tokenizer_2 = tokenizer_2
        self.tokenize = ClipTokenize(tokenizer, tokenizer_2)
        self.text_encoder_2 = text_encoder_2.requires_grad_(False).eval()
        self.time_ids = sdxl_time_ids(resolution)

    @torch.no_grad()
    def encode_ids(self, input_ids: torch.Tensor) -> Cond:
        if input_ids.dim() != 3 or input_ids.shape[1] != 2:
            raise ValueError(f"SDXL token ids must be [B, 2, L] (one row per tokenizer), "
                             f"got {tuple(input_ids.shape)}")
        te1, te2 = self.text_encoder, self.text_encoder_2
        out1 = te1(input_ids[:, 0].to(_device(te1)), output_hidden_states=True)
        out2 = te2(input_ids[:, 1].to(_device(te2)), output_hidden_states=True)
        # penultimate layers (SDXL was trained on them), concatenated on the feature dim: 768 + 1280
        h1 = out1.hidden_states[-2]
        hidden = torch.cat([h1, out2.hidden_states[-2].to(h1.device)], dim=-1)
        pooled = out2.text_embeds.to(hidden.device)
        time_ids = torch.tensor(self.time_ids, dtype=self.dtype, device=hidden.device)
        time_ids = time_ids.expand(hidden.shape[0], -1)
        return {"encoder_hidden_states": hidden.to(self.dtype), "text_embeds": pooled.to(self.dtype),
                "time_ids": time_ids}


def load_conditioner(teacher_dir: str | Path, kind: str, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu", resolution: int = 1024) -> ClipConditioner:
    """The frozen text side of a teacher directory (``local_files_only``: never a hub lookup).

    kind "toy" / "sd": ``tokenizer/`` + ``text_encoder/``; kind "sdxl" adds ``tokenizer_2/`` +
    ``text_encoder_2/`` (a CLIPTextModelWithProjection). ``resolution`` only feeds SDXL's time ids.
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sidscale.families.shared.pretrained import load_pretrained

    path = Path(teacher_dir)

    def encoder(cls, sub: str) -> torch.nn.Module:
        return load_pretrained(cls, path / sub, torch_dtype=dtype, local_files_only=True).to(device)

    tok = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    te = encoder(CLIPTextModel, "text_encoder")
    if kind != "sdxl":
        return ClipConditioner(tok, te, dtype=dtype)
    tok2 = CLIPTokenizer.from_pretrained(path / "tokenizer_2", local_files_only=True)
    te2 = encoder(CLIPTextModelWithProjection, "text_encoder_2")
    return SdxlConditioner(tok, tok2, te, te2, resolution, dtype=dtype)
