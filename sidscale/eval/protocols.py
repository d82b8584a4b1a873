"""The evaluation protocols that ``tools/fid_eval.py --protocol NAME`` reproduces, step by step.

Each protocol is the evaluation code behind a set of published numbers, as far as its steps can be
reproduced here (what cannot is listed in ``approximate`` and in docs/evaluation.md):

``sid_lsg_coco30k`` (default): SiD-LSG's one-step SD1.5 / SD2.1-base numbers, computed with
    GigaGAN's ``evaluation.py`` (also DMD2's SD1.5 numbers): 30k COCO-2014 val captions, caption i
    with seed i, fp16 generation with the VAE decoder upcast as the VAE asks (``force_upcast``),
    ``uint8(clip(x * 127.5 + 128))``; FID: torchvision centre crop + PIL Lanczos 256, clean-fid
    "clean" against COCO-2014 val; CLIP: the same crop + Lanczos 256, GigaGAN's float round trip,
    open_clip ViT-g-14 preprocessing, "A photo depicts " + caption, mean cosine.
``dmd2_coco10k_512``: DMD2's SDXL numbers (``main/sdxl/test_folder_sdxl.py``): DMD2's 10k COCO-2014
    prompts, fp32 generation and VAE, ``uint8(clip((x + 1) * 127.5))``; FID: crop + Lanczos **512**,
    clean-fid "clean" against DMD2's 10k reference images (``coco10k/subset``); CLIP: crop + Lanczos
    256 (no float round trip), ViT-g-14, the same prefix.
``sid_dit_coco10k``: SiD-DiT's in-training ``fid10k_full`` + ``open_clipscore_10k`` (apple/ml-sid-dit
    ``metrics/``): 10k images, fp16, ``uint8(clip(x * 127.5 + 128))``, PIL Lanczos 256 and a byte round
    trip; FID: the TF-Inception network resizing to 299 inside (StyleGAN/EDM path = clean-fid
    "legacy_tensorflow") against full COCO-2014 val statistics; CLIP: ViT-g-14 on the 256 image
    (/255, bicubic ``F.interpolate`` to 224, OpenAI mean/std), the caption WITHOUT a prefix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sidscale.config import ConfigError

# Bumped whenever a step of an image's FID preprocessing changes, so reference statistics cached or
# made with an older version are recomputed / refused instead of silently mixed. 2: the centre crop
# rounds its offsets half to even, as torchvision's center_crop (1 rounded them down).
FID_PROTOCOL_VERSION = 2


class ProtocolError(ConfigError):
    pass


@dataclass(frozen=True)
class EvalProtocol:
    name: str
    paper: str
    num_images: int  # images (= first N prompts) the published numbers use
    fid_size: int  # centre crop + PIL Lanczos to this size before the Inception features
    fid_mode: str  # clean-fid mode: "clean" (bicubic 299 outside) | "legacy_tensorflow" (resize inside)
    fid_round_trip: bool  # SiD-DiT's to_tensor * 255 -> byte after the Lanczos resize
    clip_prep: str  # "gigagan" | "crop_lanczos" | "sid_dit" (see sidscale/eval/clip_score.py)
    clip_prefix: str
    pixel_offset: float  # image = uint8(clip(x * 127.5 + offset, 0, 255)), truncating
    cuda_dtype: str  # generation dtype on CUDA (CPU always fp32)
    reference_set: str  # what the reference statistics must be made of
    approximate: tuple[str, ...]  # steps of the original that are not reproduced exactly

    def fid_meta(self) -> dict:
        """The part of the protocol that reference statistics depend on (cache key, stats check)."""
        return {"fid_protocol_version": FID_PROTOCOL_VERSION, "fid_mode": self.fid_mode,
                "crop": "center-square, torchvision rounding (half to even)",
                "resize": f"PIL-lanczos-{self.fid_size}" + ("+byte-round-trip" if self.fid_round_trip else ""),
                "features": "cleanfid InceptionV3W pool3 (TF-Inception torchscript)"
                            + (", resize inside" if self.fid_mode == "legacy_tensorflow" else "")}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["approximate"] = list(self.approximate)
        return d


_NOISE = "initial noise of image i is torch.randn on the CPU from seed i (the originals draw it on the GPU)"

PROTOCOLS: dict[str, EvalProtocol] = {p.name: p for p in (
    EvalProtocol(
        name="sid_lsg_coco30k", paper="SiD-LSG (arXiv 2406.01561) via GigaGAN evaluation.py; DMD2 SD1.5",
        num_images=30000, fid_size=256, fid_mode="clean", fid_round_trip=False, clip_prep="gigagan",
        clip_prefix="A photo depicts ", pixel_offset=128.0, cuda_dtype="fp16",
        reference_set="all 40,504 COCO-2014 val images (tools/ref_stats.py --images val2014)",
        approximate=(_NOISE,)),
    EvalProtocol(
        name="dmd2_coco10k_512", paper="DMD2 (arXiv 2405.14867) SDXL, main/sdxl/test_folder_sdxl.py",
        num_images=10000, fid_size=512, fid_mode="clean", fid_round_trip=False, clip_prep="crop_lanczos",
        clip_prefix="A photo depicts ", pixel_offset=127.5, cuda_dtype="fp32",
        reference_set="DMD2's 10k reference images (coco10k/subset) matching its 10k prompts (coco10k all_prompts)",
        approximate=("DMD2 draws the noise of a whole batch from torch.Generator().manual_seed(batch index); "
                     "here image i has seed i", "DMD2 also reports a patch FID (299 centre crop), not computed")),
    EvalProtocol(
        name="sid_dit_coco10k", paper="SiD-DiT (arXiv 2505.12674), apple/ml-sid-dit metrics/ (fid10k_full, "
        "open_clipscore_10k)", num_images=10000, fid_size=256, fid_mode="legacy_tensorflow", fid_round_trip=True,
        clip_prep="sid_dit", clip_prefix="", pixel_offset=128.0, cuda_dtype="fp16",
        reference_set="COCO-2014 val statistics as SiD-DiT's dataset_tool makes them (its center-crop transform to "
                  "the stats resolution); statistics from tools/ref_stats.py --protocol sid_dit_coco10k are "
                  "centre-cropped and Lanczos-resized to 256 instead",
        approximate=(_NOISE, "SiD-DiT's in-training metric draws captions from its dataset with an infinite "
                     "sampler and unseeded noise; here caption i with seed i",
                     "covariances with the N - 1 divisor (clean-fid); SiD-DiT's FeatureStats divides by N, "
                     "which scales both covariances by 1 + 1e-4 at 10k images")),
)}
DEFAULT_PROTOCOL = "sid_lsg_coco30k"


def get_protocol(name: str) -> EvalProtocol:
    if name not in PROTOCOLS:
        raise ProtocolError(f"--protocol {name!r}: expected one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
