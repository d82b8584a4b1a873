"""The UNet / rectified-flow family: the built-in flow-matching toy teacher (teacher.kind ``toy_flow``).

The same tiny ``UNet2DConditionModel`` and CLIP conditioner as the VP toy teacher, fitted to the
exact velocity of the same Gaussian mixture (``sidscale/families/toy/fit.py``, parameterisation
"flow"): ``x_t = (1 - sigma) x0 + sigma eps``, the UNet predicts ``v = eps - x0`` and reads
``timestep = 1000 sigma``, as SD3's transformer does (docs/flow_matching.md 1.1). So the flow path of
the method (FlowSchedule, K-step generator from sigma = 1, the one_minus_sigma weighting) gets the
same ground-truth quality numbers as the VP path. Pixel space: no VAE, decode is the identity.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sidscale.core.cond import Cond
from sidscale.core.schedule import FlowSchedule
from sidscale.families.base import Teacher
from sidscale.families.shared.clip import unet_kwargs
from sidscale.families.toy.fit import TIME_SCALE  # the UNet reads timestep = TIME_SCALE * sigma, as fitted

# What a toy_flow teacher directory holds (as the VP toy's, with a FlowMatchEuler scheduler).
FOLDERS = ("unet", "text_encoder", "tokenizer", "scheduler")
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"


class UNetVelocity(torch.nn.Module):
    """A UNet (or its DeepSpeed engine / ``.module``) as a velocity function ``(x_t, sigma [B], cond) -> v``
    in fp32, ``timestep = time_scale * sigma``. Inputs are cast to the network's parameter dtype."""

    def __init__(self, net: torch.nn.Module, schedule: FlowSchedule | None = None, time_scale: float = TIME_SCALE):
        super().__init__()
        self.net = net
        self.time_scale = time_scale

    def forward(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        dtype = next(self.net.parameters()).dtype
        kwargs = unet_kwargs({k: v.to(dtype) for k, v in cond.items()})
        # NOTE: the timestep stays fp32 (the sinusoidal embedding is computed in fp32; 1000 sigma in
        # bf16 would move sigma by up to 0.4 %), as in SD3Velocity.
        out = self.net(x_t.to(dtype), sigma.float() * self.time_scale, **kwargs, return_dict=False)[0]
        return out.float()


class ToyFlowFamily:
    name = "unet_flow"
    kinds = ("toy_flow",)
    network_folder = "unet"

    def network_class(self) -> type:
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel

    def load_teacher(self, cfg, device: torch.device | str) -> Teacher:
        """The (fitted, cached) flow toy teacher of ``cfg.teacher``, or the directory at teacher.path."""
        from diffusers import UNet2DConditionModel

        from sidscale.errors import TeacherDirError
        from sidscale.families.shared.clip import load_conditioner
        from sidscale.families.shared.diffusers_dir import DTYPES, check_teacher_dir
        from sidscale.families.toy.fit import resolve_teacher_dir
        from sidscale.families.unet_vp.loading import set_attention, set_channels_last

        t = cfg.teacher
        path = resolve_teacher_dir(t)
        check_teacher_dir(path, t.kind, FOLDERS)
        scheduler = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        if scheduler.get("_class_name") != FLOW_SCHEDULER:
            # a VP toy teacher read as a velocity model would train silently on nonsense
            raise TeacherDirError(f"teacher.path {path}: scheduler/scheduler_config.json is a "
                                  f"{scheduler.get('_class_name')}, not a {FLOW_SCHEDULER}: not a flow toy teacher "
                                  "(teacher.kind = 'toy_flow'); a VP toy teacher is teacher.kind = 'toy'")
        dtype = DTYPES[t.dtype]
        unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype, local_files_only=True)
        set_attention(unet, t.attention)
        if t.channels_last:
            set_channels_last(unet)
        unet = unet.to(device).requires_grad_(False).eval()
        conditioner = load_conditioner(path, "toy", dtype, device)
        size = int(unet.config.sample_size)
        if t.resolution != size:
            raise TeacherDirError(f"teacher.resolution = {t.resolution}: the toy teacher at {path} makes "
                                  f"{size}x{size} images (pixel space); set teacher.resolution={size}")
        return Teacher(path, t.kind, unet, conditioner, FlowSchedule(), (int(unet.config.in_channels), size, size),
                       1.0, None)

    def sampling_extras(self, cfg) -> dict:
        return {"time_scale": TIME_SCALE}

    def discriminator_readout(self, net: torch.nn.Module):
        """The adversarial method's read-out of ``net``'s features (families/shared/readout.py)."""
        from sidscale.families.shared.readout import unet_readout

        return unet_readout(net)

    def prediction_fn(self, net: torch.nn.Module, schedule: FlowSchedule, role: str = "generator") -> UNetVelocity:
        return UNetVelocity(net, schedule)

    def schedule_from_meta(self, meta: dict, where: str) -> FlowSchedule:
        return FlowSchedule()

    def load_conditioner(self, directory: Path, meta: dict, dtype: torch.dtype, device: torch.device | str):
        from sidscale.families.shared.clip import load_conditioner

        return load_conditioner(directory, "toy", dtype, device)

    def decode(self, vae: torch.nn.Module | None, latents: torch.Tensor, scaling_factor: float,
               shift_factor: float = 0.0) -> torch.Tensor:
        return latents.float()  # pixel space

    def pipeline_class_name(self, kind: str) -> str | None:
        return None  # not a diffusers pipeline (no VAE)

    def pipeline_folders(self, kind: str) -> tuple[str, ...]:
        return tuple(f for f in FOLDERS if f != self.network_folder)

    def teacher_sampler(self, teacher: Teacher, cond: Cond, uncond: Cond | None, cfg_scale: float, steps: int,
                        generator: torch.Generator | None = None, x_T: torch.Tensor | None = None) -> torch.Tensor:
        """The flow Euler sampler (= DDIM in the flow parameterisation), ``steps`` evaluations from sigma = 1."""
        from sidscale.core.cond import cond_batch_size
        from sidscale.families.shared.samplers import flow_sample

        shape = (cond_batch_size(cond), *teacher.latent_shape)
        v_fn = self.prediction_fn(teacher.net, teacher.schedule, role="teacher")
        return flow_sample(v_fn, teacher.schedule, shape, cond, uncond, cfg_scale, steps, generator, x_T=x_T)


FAMILY = ToyFlowFamily()
