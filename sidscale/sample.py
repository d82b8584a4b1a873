"""One- or K-step sampling from an exported generator (any family).

    python -m sidscale.sample --model RUN/export --prompt "a red circle" --seed 0 --out img.png

or in Python::

    pipe = FewStepPipeline.from_export("RUN/export", device="cuda", dtype="bf16")
    images = pipe(["a red circle"], seeds=[0])          # [-1, 1], K steps as trained

Image i is made from seed i alone (its K noises are drawn in turn from one generator seeded with
it), so the images do not depend on batching or on which rank makes them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from sidscale.export import EXPORT_META, frozen_parts_dir, read_export_meta
from sidscale.families.shared.diffusers_dir import DTYPES
from sidscale.method.sid_lsg import MethodSettings, multi_step_generate


def seeded_latent_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """z for image i from its own seed: the same image whatever the batching or sharding."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def seeded_generator_noises(seeds: Sequence[int], shape: Sequence[int], steps: int) -> list[torch.Tensor]:
    """The ``steps`` noises of a K-step generator per image, drawn in turn from the image's seed:
    the first is ``seeded_latent_noise`` (so K = 1 samples exactly what a one-step export did)."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return [torch.stack([torch.randn(tuple(shape), generator=g) for g in gens]) for _ in range(steps)]


def sampling_settings(meta: dict) -> MethodSettings:
    """The generator's steps, start level and noise type as recorded in an export / checkpoint ``sampling``
    entry (an export written before noise types existed has none: its generator used fresh noise)."""
    return MethodSettings(t_init=int(meta.get("t_init", 625)), generator_steps=int(meta.get("generator_steps", 1)),
                          sigma_init=float(meta.get("sigma_init", 1.0)),
                          noise_type=str(meta.get("noise_type", "fresh")))


class FewStepPipeline:
    """prompts + seeds -> images in [-1, 1], K generator calls each (K = the export's generator_steps)."""

    def __init__(self, net, conditioner, vae, schedule, meta: dict, device, dtype):
        from sidscale.families import family_for_kind

        self.family = family_for_kind(meta["teacher_kind"])
        self.net, self.conditioner, self.vae = net, conditioner, vae
        self.schedule, self.meta, self.device, self.dtype = schedule, meta, device, dtype
        self.settings = sampling_settings(meta)
        self.gen = self.family.prediction_fn(net, schedule)

    @classmethod
    def from_export(cls, export_dir: str | Path, device: str = "cpu", dtype: str = "fp32") -> FewStepPipeline:
        from diffusers import AutoencoderKL

        from sidscale.families import family_for_kind

        export_dir = Path(export_dir)
        meta = read_export_meta(export_dir)
        family = family_for_kind(meta["teacher_kind"])
        torch_dtype = DTYPES[dtype]
        net = family.network_class().from_pretrained(export_dir / family.network_folder, torch_dtype=torch_dtype)
        net = net.to(device).eval()
        parts = frozen_parts_dir(export_dir, meta)
        # NOTE: the teacher's own text side (SDXL: both encoders + time ids at the training resolution).
        conditioner = family.load_conditioner(parts, meta, torch_dtype, device)
        vae = None
        if (parts / "vae").is_dir():
            vae = AutoencoderKL.from_pretrained(parts / "vae", torch_dtype=torch_dtype,
                                                local_files_only=True).to(device).eval()
        # the schedule the run trained with (the teacher's), not the config's schedule.* keys
        schedule = family.schedule_from_meta(meta, str(export_dir / EXPORT_META))
        return cls(net, conditioner, vae, schedule, meta, device, torch_dtype)

    @torch.no_grad()
    def latents(self, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        noises = seeded_generator_noises(seeds, self.meta["latent_shape"], self.settings.generator_steps)
        cond = self.conditioner.encode(prompts)
        return multi_step_generate(self.gen, self.schedule, [n.to(self.device) for n in noises], cond, self.settings)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        return self.family.decode(self.vae, self.latents(prompts, seeds), float(self.meta["scaling_factor"]),
                                  float(self.meta.get("shift_factor", 0.0)))




def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 pixels with the evaluation protocol's rounding."""
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def main(argv: list[str] | None = None) -> int:
    from torchvision.utils import save_image

    from sidscale.terminal import quiet_third_party

    quiet_third_party()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="export directory (unet/ or transformer/ + sidscale.json)")
    p.add_argument("--prompt", action="append", required=True, help="repeatable")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--out", required=True, help="PNG path (a grid when several prompts)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    args = p.parse_args(argv)
    pipe = FewStepPipeline.from_export(args.model, args.device, args.dtype)
    images = pipe(args.prompt, [args.seed + i for i in range(len(args.prompt))])
    save_image(to_uint8(images).float() / 255.0, args.out, nrow=min(len(args.prompt), 8))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

