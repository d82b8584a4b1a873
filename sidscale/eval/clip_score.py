"""CLIP score: mean cosine similarity (not x100) between each image and "A photo depicts " + its prompt.

The protocol's model is open_clip ViT-g-14 with the ``laion2b_s12b_b42k`` weights, read from a local
file (open_clip accepts a path as ``pretrained``). Images go through open_clip's own validation
transform for the model (resize shortest side bicubic, centre crop, CLIP mean/std), on the saved
PNGs at their native resolution. For a file, open_clip cannot know the tag's preprocessing; the
laion2b tags of ViT-g-14 use the model's default (OpenAI mean/std, bicubic, shortest-side), which is
what a file gets, so the result matches loading the tag by name.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from sidscale.eval.fid import EvalWeightsError

CLIP_PREFIX = "A photo depicts "
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

    @torch.no_grad()
    def similarities(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """[B] cosine similarity of image b with CLIP_PREFIX + prompt b."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        x = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        tokens = self.tokenizer([CLIP_PREFIX + p for p in prompts]).to(self.device)
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


def load_clip(name: str, weights: str | os.PathLike, device: str | torch.device = "cpu") -> ClipScorer:
    import open_clip

    path = check_clip_file(name, weights)
    # pretrained_text=False: never fetch a text tower's base weights from a hub
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(path), device=device,
                                                                 pretrained_text=False)
    return ClipScorer(model.eval(), preprocess, open_clip.get_tokenizer(name), torch.device(device), name)


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
