"""The MMDiT / rectified-flow family: Stable Diffusion 3 and 3.5 (Medium, Large).

As SiD-DiT does it (docs/flow_matching.md 1): ``x_t = (1 - sigma) x0 + sigma eps``, the transformer
predicts the velocity ``eps - x0`` and takes ``timestep = 1000 sigma``; latents are 16-channel,
``(vae latent - shift_factor) * scaling_factor``; text = CLIP-L + CLIP-G penultimate states and
T5 (``sidscale/families/sd3/conditioning.py``). Presets: ``sidscale/families/sd3/presets.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sidscale.core.schedule import FlowSchedule
from sidscale.errors import ConfigError
from sidscale.families.base import Teacher

log = logging.getLogger("sidscale.train")
# SD3's transformer reads timestep = 1000 sigma (SiD-DiT: time_scale 1000 unless a "sprint" model)
TIME_SCALE = 1000.0
FROZEN_FOLDERS = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                  "text_encoder_3", "tokenizer_3")


class SD3Velocity(torch.nn.Module):
    """An SD3 transformer (or its DeepSpeed engine / ``.module``) as a velocity function
    ``(x_t, sigma [B], cond) -> v`` in fp32. Inputs are cast to the network's parameter dtype."""

    def __init__(self, net: torch.nn.Module, schedule: FlowSchedule | None = None, time_scale: float = TIME_SCALE):
        super().__init__()
        self.net = net
        self.time_scale = time_scale

    def forward(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = next(self.net.parameters()).dtype
        # NOTE: the timestep stays fp32: diffusers' sinusoidal projection computes in fp32 anyway, and
        # 1000 sigma in bf16 would move sigma by up to 0.4 %.
        out = self.net(hidden_states=x_t.to(dtype), encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                       pooled_projections=cond["pooled_projections"].to(dtype),
                       timestep=sigma.float() * self.time_scale, return_dict=False)[0]
        return out.float()


class SD3Family:
    name = "mmdit_flow"
    kinds = ("sd3",)
    network_folder = "transformer"

    def network_class(self) -> type:
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel

    def load_teacher(self, cfg, device: torch.device | str) -> Teacher:
        """Transformer, text encoders (T5 optional) and VAE of a local diffusers SD3 / SD3.5 directory."""
        from sidscale.families.sd3.conditioning import check_sd3_dir, load_sd3_conditioner
        from sidscale.families.shared.diffusers_dir import (
            DTYPES,
            load_transformer,
            load_vae,
            refuse_unet_levers,
            vae_downsampling,
        )

        t = cfg.teacher
        refuse_unet_levers(t, "an SD3 transformer")
        path = Path(t.path).expanduser()
        check_sd3_dir(path, t5=t.t5)
        dtype = DTYPES[t.dtype]
        net = load_transformer(path, self.network_class(), t.kind, dtype, device)
        # teacher.text_encoders = cpu: loaded straight into host memory (the trainer moves their outputs)
        text_device = "cpu" if t.text_encoders == "cpu" else device
        conditioner = load_sd3_conditioner(path, dtype, text_device, t5=t.t5,
                                           max_sequence_length=t.max_sequence_length)
        vae = load_vae(path, dtype, device)
        down = vae_downsampling(vae)
        patch, max_pos = int(net.config.patch_size), int(net.config.pos_embed_max_size or 0)
        if t.resolution % (down * patch):
            raise ConfigError(f"teacher.resolution = {t.resolution}: must be a multiple of {down * patch} (the VAE "
                              f"factor {down} x the transformer's patch size {patch})")
        tokens_per_side = t.resolution // down // patch
        if max_pos and tokens_per_side > max_pos:
            raise ConfigError(f"teacher.resolution = {t.resolution}: {tokens_per_side} patches per side exceed the "
                              f"transformer's pos_embed_max_size = {max_pos} (at most {max_pos * down * patch} px)")
        size = t.resolution // down
        return Teacher(path, t.kind, net, conditioner, FlowSchedule(), (int(net.config.in_channels), size, size),
                       float(vae.config.scaling_factor), vae, float(vae.config.shift_factor or 0.0))

    def discriminator_readout(self, net: torch.nn.Module):
        """The adversarial method's read-out of ``net``'s features (families/shared/readout.py)."""
        from sidscale.families.shared.readout import transformer_readout

        return transformer_readout(net)

    def prediction_fn(self, net: torch.nn.Module, schedule: FlowSchedule, role: str = "generator") -> SD3Velocity:
        return SD3Velocity(net, schedule)

    def sampling_extras(self, cfg) -> dict:
        return {"t5": bool(cfg.teacher.t5), "max_sequence_length": int(cfg.teacher.max_sequence_length),
                "time_scale": TIME_SCALE}

    def schedule_from_meta(self, meta: dict, where: str) -> FlowSchedule:
        return FlowSchedule()

    def load_conditioner(self, directory: Path, meta: dict, dtype: torch.dtype, device: torch.device | str):
        from sidscale.families.sd3.conditioning import load_sd3_conditioner

        return load_sd3_conditioner(directory, dtype, device, t5=bool(meta.get("t5", True)),
                                    max_sequence_length=int(meta.get("max_sequence_length", 77)))

    def decode(self, vae: torch.nn.Module | None, latents: torch.Tensor, scaling_factor: float,
               shift_factor: float = 0.0) -> torch.Tensor:
        """Latents -> images in [-1, 1]: ``vae.decode(latents / scaling + shift)``, as the SD3 pipeline;
        an fp16 VAE with ``force_upcast`` (SD3's has it) decodes upcast like SiD-LSG's (``decode_precision``)."""
        from sidscale.families.shared.diffusers_dir import decode_shifted

        return decode_shifted(vae, latents, scaling_factor, shift_factor)

    def pipeline_class_name(self, kind: str) -> str:
        return "StableDiffusion3Pipeline"

    def pipeline_folders(self, kind: str) -> tuple[str, ...]:
        return FROZEN_FOLDERS

    def teacher_sampler(self, teacher: Teacher, cond: dict, uncond: dict | None, cfg_scale: float, steps: int,
                        generator: torch.Generator | None = None, x_T: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's multi-step sampler as ``StableDiffusion3Pipeline`` runs it: Euler steps of the flow
        ODE, ``x <- x + (sigma_next - sigma) v``, on the sigma grid of the teacher's own
        ``FlowMatchEulerDiscreteScheduler`` (SD3: shift 3, from 1 down to 0), CFG on the velocity.
        Returns the latents at sigma = 0. x_T: [B, *latent_shape] (else drawn on the CPU from ``generator``)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        from sidscale.core.cond import cond_batch_size
        from sidscale.families.shared.samplers import flow_euler

        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(Path(teacher.path) / "scheduler")
        scheduler.set_timesteps(steps)
        sigmas = scheduler.sigmas.to(torch.float32).tolist()
        batch = cond_batch_size(cond)
        if x_T is None:
            x_T = torch.randn((batch, *teacher.latent_shape), generator=generator, dtype=torch.float32)
        v_fn = self.prediction_fn(teacher.net, teacher.schedule, role="teacher")
        return flow_euler(v_fn, sigmas, x_T, cond, uncond, cfg_scale)


FAMILY = SD3Family()
