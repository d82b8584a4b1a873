"""The FLUX.1 family (FLUX.1-dev: a guidance-distilled 12B rectified-flow transformer).

As SiD-DiT does it (docs/flow_matching.md 1.1, 1.7, 4): ``x_t = (1 - sigma) x0 + sigma eps``, the
transformer predicts the velocity ``eps - x0`` and takes ``timestep = sigma`` in [0, 1] (it
multiplies timestep and guidance by 1000 itself; FluxPipeline passes ``t / 1000`` of its 0..1000
scheduler timesteps). Latents are 16-channel ``(vae latent - shift_factor) * scaling_factor``,
kept UNPACKED ``[B, 16, H/8, W/8]`` everywhere in sidscale (noise, generator, EMA, export); the
network call packs them into 2x2 patches ``[B, (H/16)(W/16), 64]`` with the image tokens' RoPE
ids ``(0, row, col)`` and unpacks its output, exactly as ``FluxPipeline._pack_latents`` /
``_prepare_latent_image_ids`` / ``_unpack_latents``. Text = CLIP-L pooled + T5 states
(``sidscale/families/flux/conditioning.py``), text ids = zeros [L, 3].

Distilled guidance (the ``distilled_guidance`` config section): FLUX.1-dev takes a guidance scale
as an input embedding. Two ways to set it (``distilled_guidance.mode``):

* ``official`` (the flux_dev preset): as SiD-DiT's released FLUX code. Teacher and fake net get the
  guidance scale of the CALL as their embedding, and true CFG with E("") at that same scale: the
  fake update calls the fake net at ``method.cfg_train_fake`` (k1), the generator update calls the
  fake net at ``cfg_eval_fake`` (k2) and the teacher at ``cfg_eval_real`` (k4). A scale of 1 or 0
  runs the conditional branch only, with embedding 1 or 0 (0 is NOT "unconditional" here, unlike
  ``guided_eps``'s generic CFG). The generator gets ``distilled_guidance.generator`` (1.0: SiD-DiT
  never overrides it) and no CFG. ``FluxGuidedVelocity.guided`` does this; ``guided_eps`` hands
  the call to it.
* ``per_role``: each net has a fixed embedding, bound when its prediction function is made
  (``prediction_fn(net, schedule, role)``): teacher ``distilled_guidance.teacher`` (3.5, BFL's
  default), fake net ``distilled_guidance.fake`` (null = the teacher's: the fake net models the
  generator's distribution at the teacher's guidance), generator ``distilled_guidance.generator``.
  True CFG on top is the method's ``cfg_*`` scales with E("") as the negative prompt (1: off), kept
  apart from the embedding.

Noise levels. FLUX's scheduler shifts its sampling sigmas by a resolution-dependent ``mu``
(``use_dynamic_shifting``). A shift only changes WHERE along sigma a sampler places its steps; the
network is always called with the true sigma of its input. So training uses ``FlowSchedule`` as
SD3 does and as SiD-DiT's FLUX loop does (its ``time_shift(mu)`` option defaults to off): the
generator's K levels are the unshifted ``sigma_init (1 - i/K)`` = 1, 0.75, 0.5, 0.25, the loss
sigmas the unshifted logit-normal, and teacher, fake and generator all read ``timestep = sigma``.
Only the teacher's own multi-step sampler (``teacher_sampler``, the preview's reference) uses the
dynamic shift, exactly as ``FluxPipeline``: ``linspace(1, 1/N, N)`` shifted by
``mu = calculate_shift((H/16)(W/16))``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sidscale.core.schedule import FlowSchedule
from sidscale.errors import ConfigError
from sidscale.families.base import ROLES, Teacher
from sidscale.families.flux.config import GUIDANCE_MODES

log = logging.getLogger("sidscale.train")
# FluxTransformer2DModel reads timestep = sigma in [0, 1] (it scales by 1000 internally)
TIME_SCALE = 1.0
FROZEN_FOLDERS = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
PACK = 2  # FLUX packs 2x2 latent pixels into one token


# --------------------------------------------------------------------------------------------- latents
def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C], as ``FluxPipeline._pack_latents`` (row-major 2x2 patches)."""
    b, c, h, w = x.shape
    if h % PACK or w % PACK:
        raise ValueError(f"FLUX latents must have even sides to be packed 2x2, got {tuple(x.shape)}")
    x = x.view(b, c, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: [B, (h/2)(w/2), 4C] -> [B, C, h, w] (``h``, ``w``: latent sides)."""
    b, n, c4 = x.shape
    if n != (h // PACK) * (w // PACK) or c4 % (PACK * PACK):
        raise ValueError(f"packed FLUX latents {tuple(x.shape)} do not fit a {h}x{w} latent grid")
    x = x.view(b, h // PACK, w // PACK, c4 // (PACK * PACK), PACK, PACK).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // (PACK * PACK), h, w)


def latent_image_ids(h_tokens: int, w_tokens: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """[h_tokens * w_tokens, 3] RoPE ids ``(0, row, col)`` of the packed image tokens, row-major, as
    ``FluxPipeline._prepare_latent_image_ids`` (2-D: the 3-D form is deprecated in diffusers)."""
    rows = torch.arange(h_tokens, device=device).view(-1, 1).expand(h_tokens, w_tokens)
    cols = torch.arange(w_tokens, device=device).view(1, -1).expand(h_tokens, w_tokens)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)
    return ids.reshape(h_tokens * w_tokens, 3).to(dtype)


# --------------------------------------------------------------------------------------------- schedule
@dataclass
class FluxSchedule(FlowSchedule):
    """``FlowSchedule`` (the same noise, levels and conversions) plus how each role's network gets its
    guidance embedding (module docstring): ``mode`` per_role with one scale per role, or official with
    the generator's scale only (teacher and fake None: their embedding is the scale of each call). It
    travels with the schedule because the schedule is what every caller of ``prediction_fn`` already
    holds (trainer, sampler, teacher sampler, benchmark)."""

    guidance: dict[str, float | None] = field(default_factory=lambda: {"teacher": 3.5, "fake": 3.5, "generator": 1.0})
    mode: str = "per_role"

    def __post_init__(self) -> None:
        if self.mode not in GUIDANCE_MODES:
            raise ValueError(f"FluxSchedule.mode {self.mode!r}: expected one of {', '.join(GUIDANCE_MODES)}")
        if set(self.guidance) != set(ROLES):
            raise ValueError(f"FluxSchedule.guidance: expected one scale per role {ROLES}, got {self.guidance!r}")
        coupled = ("teacher", "fake") if self.mode == "official" else ()
        for role in ROLES:
            value = self.guidance[role]
            if (value is None) != (role in coupled):
                raise ValueError(f"FluxSchedule.guidance[{role!r}] = {value!r} in mode {self.mode}: expected "
                                 + ("None (the call's CFG scale is the embedding)" if role in coupled else "a scale"))
        self.guidance = {r: None if self.guidance[r] is None else float(self.guidance[r]) for r in ROLES}

    def meta(self, source: str) -> dict:
        return {**super().meta(source), "distilled_guidance": dict(self.guidance), "guidance_mode": self.mode}


def guidance_from_config(cfg) -> dict[str, float | None]:
    """The ``distilled_guidance`` section as ``FluxSchedule.guidance``: per_role, one scale per role (fake
    null = the teacher's); official, the generator's only (teacher and fake follow each call's scale)."""
    g = cfg.distilled_guidance
    if g.mode == "official":
        return {"teacher": None, "fake": None, "generator": g.generator}
    return {"teacher": g.teacher, "fake": g.teacher if g.fake is None else g.fake, "generator": g.generator}


# --------------------------------------------------------------------------------------------- the network call
class FluxVelocity(torch.nn.Module):
    """A FLUX transformer (or its DeepSpeed engine / ``.module``) as a velocity function
    ``(x_t [B, 16, h, w], sigma [B], cond) -> v`` in fp32, called with ``guidance`` as the guidance
    embedding (None for a transformer without one, e.g. FLUX.1-schnell). Inputs are cast to the
    network's parameter dtype; sigma and guidance stay fp32 (the model casts them itself)."""

    def __init__(self, net: torch.nn.Module, schedule: FlowSchedule | None = None, guidance: float | None = None,
                 time_scale: float = TIME_SCALE):
        super().__init__()
        self.net = net
        self.guidance = guidance
        self.time_scale = time_scale

    def forward(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.velocity(x_t, sigma, cond, self.guidance)

    def velocity(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor],
                 guidance_scale: float | None) -> torch.Tensor:
        """The network's velocity with guidance embedding ``guidance_scale`` (None: no embedding input)."""
        dtype = next(self.net.parameters()).dtype
        b, _, h, w = x_t.shape
        text = cond["encoder_hidden_states"]
        guidance = None
        if guidance_scale is not None:
            guidance = torch.full((b,), float(guidance_scale), dtype=torch.float32, device=x_t.device)
        out = self.net(hidden_states=pack_latents(x_t.to(dtype)), encoder_hidden_states=text.to(dtype),
                       pooled_projections=cond["pooled_projections"].to(dtype),
                       timestep=sigma.float() * self.time_scale, guidance=guidance,
                       img_ids=latent_image_ids(h // PACK, w // PACK, x_t.device, dtype),
                       txt_ids=torch.zeros(text.shape[1], 3, device=x_t.device, dtype=dtype),
                       return_dict=False)[0]
        return unpack_latents(out, h, w).float()


class FluxGuidedVelocity(FluxVelocity):
    """Teacher / fake net in guidance mode ``official`` (SiD-DiT's FLUX code): the guidance scale ``s`` of
    each call is both the guidance embedding and the true-CFG scale. ``guided_eps`` hands the call here
    (``guided``); a bare forward has no scale to use, so it refuses."""

    def __init__(self, net: torch.nn.Module, schedule: FlowSchedule | None = None, time_scale: float = TIME_SCALE):
        super().__init__(net, schedule, None, time_scale)

    def forward(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        raise RuntimeError("a FLUX teacher / fake net in distilled_guidance.mode official takes its guidance "
                           "embedding from the CFG scale of the call: call it through guided_eps")

    def conditional(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor],
                    scale: float) -> torch.Tensor:
        """``v(cond; g=scale)`` without CFG: the adversarial method's real-sample call, whose guidance
        embedding is the fake net's training scale (as the released code passes it)."""
        return self.velocity(x_t, sigma, cond, float(scale))

    def guided(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor],
               uncond: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        """``v(cond; g=s)`` when s is 1 or 0 (one conditional call; 0 is an embedding of 0, not the
        unconditional branch), else ``v(u; g=s) + s (v(c; g=s) - v(u; g=s))`` in one call of batch 2B."""
        from sidscale.core.cond import cat_conds

        scale = float(scale)
        if scale in (0.0, 1.0):
            return self.velocity(x_t, sigma, cond, scale)
        both = self.velocity(torch.cat([x_t, x_t]), torch.cat([sigma, sigma]), cat_conds([uncond, cond]), scale)
        v_uncond, v_cond = both.chunk(2)
        return v_uncond + scale * (v_cond - v_uncond)


def _network_config(net: torch.nn.Module):
    return getattr(net, "module", net).config  # a DeepSpeed engine wraps the diffusers model


class FluxFamily:
    name = "flux_flow"
    kinds = ("flux",)
    network_folder = "transformer"

    def network_class(self) -> type:
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel

    def load_teacher(self, cfg, device: torch.device | str) -> Teacher:
        """Transformer, CLIP-L + T5 and VAE of a local diffusers FLUX directory (FluxPipeline layout)."""
        from sidscale.families.flux.conditioning import check_flux_dir, load_flux_conditioner
        from sidscale.families.shared.diffusers_dir import (
            DTYPES,
            load_transformer,
            load_vae,
            refuse_unet_levers,
            vae_downsampling,
        )

        t = cfg.teacher
        refuse_unet_levers(t, "a FLUX transformer")
        if not t.t5:
            raise ConfigError("teacher.t5 = false: FLUX's text tokens are T5's states only (there is no zeros "
                              "fallback in FluxPipeline); set teacher.t5=true for teacher.kind flux")
        path = Path(t.path).expanduser()
        check_flux_dir(path)
        dtype = DTYPES[t.dtype]
        net = load_transformer(path, self.network_class(), t.kind, dtype, device)
        # teacher.text_encoders = cpu: loaded straight into host memory (the trainer moves their outputs)
        text_device = "cpu" if t.text_encoders == "cpu" else device
        conditioner = load_flux_conditioner(path, dtype, text_device, max_sequence_length=t.max_sequence_length,
                                            joint_attention_dim=int(net.config.joint_attention_dim),
                                            pooled_projection_dim=int(net.config.pooled_projection_dim))
        vae = load_vae(path, dtype, device)
        down = vae_downsampling(vae)
        if t.resolution % (down * PACK):
            raise ConfigError(f"teacher.resolution = {t.resolution}: must be a multiple of {down * PACK} (the VAE "
                              f"factor {down} x FLUX's 2x2 latent packing)")
        channels = int(net.config.in_channels) // (PACK * PACK)
        if channels != int(vae.config.latent_channels):
            raise ConfigError(f"teacher.path {path}: the transformer reads {net.config.in_channels} = 4 x {channels} "
                              f"packed channels, the VAE has {vae.config.latent_channels} latent channels")
        guidance = guidance_from_config(cfg)
        if not net.config.guidance_embeds:
            log.info("FLUX teacher without a guidance embedding (guidance_embeds=false): the distilled_guidance "
                     "scales are not used")
        size = t.resolution // down
        schedule = FluxSchedule(guidance=guidance, mode=cfg.distilled_guidance.mode)
        return Teacher(path, t.kind, net, conditioner, schedule, (channels, size, size),
                       float(vae.config.scaling_factor), vae, float(vae.config.shift_factor or 0.0))

    def discriminator_readout(self, net: torch.nn.Module):
        """The adversarial method's read-out of ``net``'s features (families/shared/readout.py)."""
        from sidscale.families.shared.readout import transformer_readout

        return transformer_readout(net)

    def prediction_fn(self, net: torch.nn.Module, schedule: FluxSchedule, role: str = "generator") -> FluxVelocity:
        """``net``'s velocity function with the guidance embedding of ``role`` (module docstring)."""
        if role not in ROLES:
            raise ValueError(f"prediction_fn role {role!r}: expected one of {', '.join(ROLES)}")
        if not isinstance(schedule, FluxSchedule):
            raise TypeError(f"the FLUX family needs a FluxSchedule (it carries the per-role guidance), got "
                            f"{type(schedule).__name__}")
        if not _network_config(net).guidance_embeds:
            return FluxVelocity(net, schedule, None)
        if schedule.mode == "official" and role != "generator":
            return FluxGuidedVelocity(net, schedule)
        return FluxVelocity(net, schedule, schedule.guidance[role])

    def sampling_extras(self, cfg) -> dict:
        return {"max_sequence_length": int(cfg.teacher.max_sequence_length), "time_scale": TIME_SCALE}

    def schedule_from_meta(self, meta: dict, where: str) -> FluxSchedule:
        schedule = meta.get("schedule", {})
        guidance = schedule.get("distilled_guidance")
        if not isinstance(guidance, dict):
            raise ValueError(f"{where}: schedule.distilled_guidance is missing (a FLUX export records the guidance "
                             "embedding scale of each net)")
        # exports written before the official mode existed are per_role
        mode = schedule.get("guidance_mode", "per_role")
        try:
            return FluxSchedule(guidance=guidance, mode=mode)
        except ValueError as e:
            raise ValueError(f"{where}: schedule: {e}") from None

    def load_conditioner(self, directory: Path, meta: dict, dtype: torch.dtype, device: torch.device | str):
        from sidscale.families.flux.conditioning import load_flux_conditioner

        return load_flux_conditioner(directory, dtype, device, max_sequence_length=int(meta["max_sequence_length"]))

    def decode(self, vae: torch.nn.Module | None, latents: torch.Tensor, scaling_factor: float,
               shift_factor: float = 0.0) -> torch.Tensor:
        """Unpacked latents -> images in [-1, 1]: ``vae.decode(latents / scaling + shift)``, as FluxPipeline
        does after ``_unpack_latents``."""
        from sidscale.families.shared.diffusers_dir import decode_shifted

        return decode_shifted(vae, latents, scaling_factor, shift_factor)

    def pipeline_class_name(self, kind: str) -> str:
        return "FluxPipeline"

    def pipeline_folders(self, kind: str) -> tuple[str, ...]:
        return FROZEN_FOLDERS

    def teacher_sigmas(self, teacher: Teacher, steps: int) -> list[float]:
        """The teacher's sampling sigmas as ``FluxPipeline`` sets them: ``linspace(1, 1/N, N)`` through its
        scheduler (dynamic shift with ``mu`` from the packed image token count), then 0."""
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(Path(teacher.path) / "scheduler")
        c = scheduler.config
        _, h, w = teacher.latent_shape
        mu = calculate_shift((h // PACK) * (w // PACK), c.get("base_image_seq_len", 256),
                             c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        return scheduler.sigmas.to(torch.float32).tolist()

    def teacher_sampler(self, teacher: Teacher, cond: dict, uncond: dict | None, cfg_scale: float, steps: int,
                        generator: torch.Generator | None = None, x_T: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's multi-step sampler as ``FluxPipeline`` runs it: Euler steps of the flow ODE,
        ``x <- x + (sigma_next - sigma) v``, on ``teacher_sigmas``, with the teacher's guidance embedding
        and true CFG ``cfg_scale`` on the velocity (1: off, FluxPipeline's default). Returns the unpacked
        latents at sigma = 0. x_T: [B, *latent_shape] (else drawn on the CPU from ``generator``)."""
        from sidscale.core.cond import cond_batch_size
        from sidscale.families.shared.samplers import flow_euler

        sigmas = self.teacher_sigmas(teacher, steps)
        batch = cond_batch_size(cond)
        if x_T is None:
            x_T = torch.randn((batch, *teacher.latent_shape), generator=generator, dtype=torch.float32)
        v_fn = self.prediction_fn(teacher.net, teacher.schedule, role="teacher")
        return flow_euler(v_fn, sigmas, x_T, cond, uncond, cfg_scale)


FAMILY = FluxFamily()
