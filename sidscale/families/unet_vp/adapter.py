"""The UNet / discrete-VP adapter: SD1.5, SD2.1 (eps or v), SDXL, and the built-in VP toy teacher.

Loading is ``loading.py``, the CLIP conditioners ``shared/clip.py``, the architectures ``presets.py``;
this module is the family's face to the rest of sidscale, and ``UNetEps`` its prediction function.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sidscale.core.cond import Cond
from sidscale.core.schedule import VPSchedule
from sidscale.families.base import Teacher
from sidscale.families.shared.clip import unet_kwargs

log = logging.getLogger("sidscale.train")


class UNetVPFamily:
    name = "unet_vp"
    kinds = ("toy", "sd", "sdxl")
    network_folder = "unet"

    def network_class(self) -> type:
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel

    def load_teacher(self, cfg, device: torch.device | str) -> Teacher:
        """The teacher of ``cfg.teacher``; warns when ``cfg.schedule`` differs from its scheduler."""
        from sidscale.core.schedule import make_alphas_cumprod
        from sidscale.families.unet_vp.loading import load_teacher

        teacher = load_teacher(cfg.teacher, device)
        sc = cfg.schedule
        if not torch.equal(make_alphas_cumprod(sc.num_train_timesteps, sc.beta_start, sc.beta_end, sc.beta_schedule),
                           teacher.schedule.alphas_cumprod.cpu()):
            log.warning("schedule.* (%s) differs from the teacher's scheduler_config.json: training, the export and "
                        "sampling use the teacher's schedule; the schedule.* keys are not read", sc)
        return teacher

    def sampling_extras(self, cfg) -> dict:
        return {}

    def discriminator_readout(self, net: torch.nn.Module):
        """The adversarial method's read-out of ``net``'s features (families/shared/readout.py)."""
        from sidscale.families.shared.readout import unet_readout

        return unet_readout(net)

    def prediction_fn(self, net: torch.nn.Module, schedule: VPSchedule, role: str = "generator") -> torch.nn.Module:
        """eps in fp32 (v-prediction teachers converted), ``timestep`` = the integer t."""
        from sidscale.families.unet_vp.adapter import UNetEps

        return UNetEps(net, schedule)

    def schedule_from_meta(self, meta: dict, where: str) -> VPSchedule:
        from sidscale.export import export_schedule

        return export_schedule(meta, where)

    def load_conditioner(self, directory: Path, meta: dict, dtype: torch.dtype, device: torch.device | str):
        from sidscale.families.shared.clip import load_conditioner

        return load_conditioner(directory, meta["teacher_kind"], dtype, device, resolution=int(meta["resolution"]))

    def decode(self, vae: torch.nn.Module | None, latents: torch.Tensor, scaling_factor: float,
               shift_factor: float = 0.0) -> torch.Tensor:
        from sidscale.families.unet_vp.loading import decode_latents

        return decode_latents(vae, latents, scaling_factor)

    def pipeline_class_name(self, kind: str) -> str | None:
        # the toy teacher is not a diffusers pipeline (no VAE: it lives in pixel space)
        return {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}.get(kind)

    def pipeline_folders(self, kind: str) -> tuple[str, ...]:
        from sidscale.families.unet_vp.loading import REQUIRED

        return tuple(f for f in REQUIRED[kind] if f != self.network_folder)

    def teacher_sampler(self, teacher: Teacher, cond: dict, uncond: dict | None, cfg_scale: float, steps: int,
                        generator: torch.Generator | None = None, x_T: torch.Tensor | None = None) -> torch.Tensor:
        """Deterministic DDIM (``shared/samplers.py``), ``steps`` evaluations from t = T-1, CFG on eps; latents x0.
        x_T: [B, *latent_shape] (else drawn on the CPU from ``generator``)."""
        from sidscale.core.cond import cond_batch_size
        from sidscale.families.shared.samplers import ddim_sample

        shape = (cond_batch_size(cond), *teacher.latent_shape)
        eps_fn = self.prediction_fn(teacher.net, teacher.schedule, role="teacher")
        return ddim_sample(eps_fn, teacher.schedule, shape, cond, uncond, cfg_scale, steps, generator, x_T=x_T)


FAMILY = UNetVPFamily()


class UNetEps(torch.nn.Module):
    """Wraps a UNet (or a DeepSpeed engine / its ``.module``) so the method sees eps only.

    Inputs are cast to the network's parameter dtype (bf16/fp16 teachers hold low-precision
    weights without autocast); the output comes back as fp32 eps, converted from v when the
    teacher predicts v.
    """

    def __init__(self, net: torch.nn.Module, schedule: VPSchedule, dtype: torch.dtype | None = None):
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.dtype = dtype

    def _dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        return next(self.net.parameters()).dtype

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        dtype = self._dtype()
        kwargs = unet_kwargs({k: v.to(dtype) for k, v in cond.items()})
        out = self.net(x_t.to(dtype), t, **kwargs, return_dict=False)[0]
        return self.schedule.model_output_to_eps(x_t.float(), out.float(), t)
