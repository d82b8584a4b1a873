"""One-step sampling from an exported generator.

    python -m sidscale.sample --model RUN/export --prompt "a red circle" --seed 0 --out img.png
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from sidscale.export import EXPORT_META, export_schedule, read_export_meta
from sidscale.method.sid_lsg import one_step_generate
from sidscale.models.teacher import DTYPES, check_teacher_dir, decode_latents
from sidscale.models.unet_eps import UNetEps
from sidscale.schedule import VPSchedule


def seeded_latent_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """z for image i from its own seed: the same image whatever the batching or sharding."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


class OneStepPipeline:
    """prompts + seeds -> images in [-1, 1], one generator call each."""

    def __init__(self, unet, conditioner, vae, schedule: VPSchedule, meta: dict, device, dtype):
        self.unet, self.conditioner, self.vae = unet, conditioner, vae
        self.schedule, self.meta, self.device, self.dtype = schedule, meta, device, dtype
        self.gen = UNetEps(unet, schedule)

    @classmethod
    def from_export(cls, export_dir: str | Path, device: str = "cpu", dtype: str = "fp32") -> OneStepPipeline:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        from sidscale.models.conditioning import load_conditioner

        export_dir = Path(export_dir)
        meta = read_export_meta(export_dir)
        torch_dtype = DTYPES[dtype]
        teacher = Path(meta["teacher_path"])
        check_teacher_dir(teacher, meta["teacher_kind"])
        unet = UNet2DConditionModel.from_pretrained(export_dir / "unet", torch_dtype=torch_dtype).to(device).eval()
        # NOTE: the teacher's own text side (SDXL: both encoders + time ids at the training resolution).
        conditioner = load_conditioner(teacher, meta["teacher_kind"], torch_dtype, device,
                                       resolution=int(meta["resolution"]))
        vae = None
        if (teacher / "vae").is_dir():
            vae = AutoencoderKL.from_pretrained(teacher / "vae", torch_dtype=torch_dtype,
                                                local_files_only=True).to(device).eval()
        # the schedule the run trained with (the teacher's), not the config's schedule.* keys
        schedule = export_schedule(meta, export_dir / EXPORT_META)
        return cls(unet, conditioner, vae, schedule, meta, device, torch_dtype)

    @torch.no_grad()
    def latents(self, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        z = seeded_latent_noise(seeds, self.meta["latent_shape"]).to(self.device)
        cond = self.conditioner.encode(prompts)
        return one_step_generate(self.gen, self.schedule, z, cond, int(self.meta["t_init"]))

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        return decode_latents(self.vae, self.latents(prompts, seeds), float(self.meta["scaling_factor"]))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 pixels with the evaluation protocol's rounding."""
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def main(argv: list[str] | None = None) -> int:
    from torchvision.utils import save_image

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="export directory (unet/ + sidscale.json)")
    p.add_argument("--prompt", action="append", required=True, help="repeatable")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--out", required=True, help="PNG path (a grid when several prompts)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    args = p.parse_args(argv)
    pipe = OneStepPipeline.from_export(args.model, args.device, args.dtype)
    images = pipe(args.prompt, [args.seed + i for i in range(len(args.prompt))])
    save_image(to_uint8(images).float() / 255.0, args.out, nrow=min(len(args.prompt), 8))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

