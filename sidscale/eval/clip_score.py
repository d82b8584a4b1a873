"""CLIP score: mean cosine similarity (not x100) between each image and its caption, as the protocol's
evaluation code computes it (``sidscale/eval/protocols.py``).

The model is open_clip ViT-g-14 with the ``laion2b_s12b_b42k`` weights, read from a local file
(open_clip accepts a path as ``pretrained``; nothing is downloaded). For a file, open_clip cannot know
the tag's preprocessing; the laion2b tags of ViT-g-14 use the model's default (OpenAI mean/std,
bicubic, shortest side), which is what a file gets, so the result matches loading the tag by name.

Image preparation before CLIP (``clip_prep`` of the protocol), from the saved PNG:

``gigagan`` (SiD-LSG's numbers, GigaGAN ``evaluation.py``): torchvision-rounded centre crop, PIL
    Lanczos to 256, then GigaGAN's float round trip ``ToTensor -> Normalize(0.5, 0.5) ->
    uint8((x + 1) * 127.5)`` (truncation: 63 of the 256 values drop by one), then open_clip's
    validation transform (bicubic resize to 224, centre crop, CLIP mean/std).
``crop_lanczos`` (DMD2): the same without the float round trip.
``sid_dit`` (SiD-DiT's ``open_clipscore``): Lanczos to 256 and a byte round trip, x / 255, bicubic
    ``F.interpolate`` to the model's 224 (align_corners=False, no antialias), OpenAI mean/std.

Text: the protocol's prefix ("A photo depicts " for GigaGAN and DMD2, none for SiD-DiT) + caption,
open_clip's tokenizer (the same BPE and 77-token truncation as the OpenAI tokenizer GigaGAN uses).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sidscale.eval.fid import EvalWeightsError
from sidscale.eval.images import FID_SIZE, byte_round_trip, crop_lanczos, gigagan_float_round_trip
from sidscale.eval.protocols import DEFAULT_PROTOCOL, EvalProtocol, get_protocol

CLIP_PREFIX = "A photo depicts "
CLIP_SIZE = FID_SIZE  # every protocol scores the 256 px image
# OpenAI CLIP's normalisation (open_clip.constants.OPENAI_DATASET_MEAN / _STD; timm's OPENAI_CLIP_*)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_CLIP_MODEL = "ViT-g-14"
CLIP_SOURCES = {
    "ViT-g-14": "laion2b_s12b_b42k: https://huggingface.co/laion/CLIP-ViT-g-14-laion2B-s12B-b42K "
                "(open_clip_pytorch_model.bin)",
}


@dataclass
class ClipScorer:
    model: torch.nn.Module
    preprocess: object
    tokenizer: object
    device: torch.device
    name: str
    prep: str = "gigagan"  # the protocol's clip_prep (module docstring)
    prefix: str = CLIP_PREFIX

    def image_input(self, im: Image.Image) -> torch.Tensor:
        """One saved image -> the [3, S, S] tensor the protocol's code feeds to CLIP."""
        small = crop_lanczos(im, CLIP_SIZE)
        if self.prep == "gigagan":
            return self.preprocess(gigagan_float_round_trip(small))
        if self.prep == "crop_lanczos":
            return self.preprocess(small)
        if self.prep == "sid_dit":
            x = torch.from_numpy(byte_round_trip(np.asarray(small))).permute(2, 0, 1).to(torch.float32) / 255.0
            size = self.model.visual.image_size
            x = F.interpolate(x[None], size=size, mode="bicubic", align_corners=False)[0]
            mean, std = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)
            return (x - mean) / std
        raise ValueError(f"unknown CLIP image preparation {self.prep!r}")

    @torch.no_grad()
    def similarities(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """[B] cosine similarity of image b with the prefix + prompt b."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        x = torch.stack([self.image_input(im.convert("RGB")) for im in images]).to(self.device)
        tokens = self.tokenizer([self.prefix + p for p in prompts]).to(self.device)
        img = self.model.encode_image(x).float()
        txt = self.model.encode_text(tokens).float()
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return (img * txt).sum(dim=-1).cpu()


def check_clip_file(name: str, weights: str | os.PathLike) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        where = CLIP_SOURCES.get(name, f"the open_clip pretrained tags of {name} (open_clip.list_pretrained())")
        raise EvalWeightsError(f"--clip-weights {path}: file not found. The CLIP score needs the {name} weights "
                               f"as a local file, published as {where}; nothing is downloaded here")
    return path


def load_clip(name: str, weights: str | os.PathLike, device: str | torch.device = "cpu",
              protocol: EvalProtocol | None = None) -> ClipScorer:
    import open_clip

    protocol = protocol or get_protocol(DEFAULT_PROTOCOL)
    path = check_clip_file(name, weights)
    # pretrained_text=False: never fetch a text tower's base weights from a hub
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(path), device=device,
                                                                 pretrained_text=False)
    # fp32 as GigaGAN / DMD2 (clip.float()) and SiD-DiT (a float32 pickle) score
    return ClipScorer(model.float().eval(), preprocess, open_clip.get_tokenizer(name), torch.device(device), name,
                      protocol.clip_prep, protocol.clip_prefix)


def clip_score_files(
    scorer: ClipScorer, files: Sequence[Path], prompts: Sequence[str], batch: int = 32
) -> tuple[float, float]:
    """(mean cosine similarity over the pairs, images per second)."""
    if len(files) != len(prompts) or not files:
        raise ValueError(f"need as many prompts as images (and at least one): {len(files)} / {len(prompts)}")
    t0, total = time.perf_counter(), 0.0
    for s in range(0, len(files), batch):
        images = []
        for f in files[s:s + batch]:
            with Image.open(f) as im:
                images.append(im.convert("RGB"))
        total += float(scorer.similarities(images, prompts[s:s + batch]).double().sum())
    return total / len(files), len(files) / max(time.perf_counter() - t0, 1e-9)
