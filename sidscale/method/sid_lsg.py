"""SiD-LSG: one fake-score step and one generator step, on networks and tensors only.

No DeepSpeed, no data, no I/O here: the caller passes eps-functions (see ``guidance.EpsFn``),
the noise of the step (``StepNoise``) and the conditionings, and gets back a scalar loss to
backpropagate plus detached statistics for logging. The normaliser of the loss is the per-rank
batch, given by the caller (``loss_normaliser``), so micro-batch sums add up to the method
page's "summed over latent elements and micro-batches, divided by the per-rank batch".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sidscale.method.guards import finite_samples, masked_sum
from sidscale.method.guidance import EpsFn, guided_eps
from sidscale.method.losses import at_least_fp32, fake_score_loss, sid_generator_loss
from sidscale.models.conditioning import Cond, where_cond
from sidscale.schedule import VPSchedule


@dataclass(frozen=True)
class MethodSettings:
    """The method knobs of the method page (a view of ``config.MethodConfig``)."""

    cfg_train_fake: float = 1.5  # k1
    cfg_eval_fake: float = 1.5  # k2 = k3
    cfg_eval_real: float = 1.5  # k4
    alpha: float = 1.0
    t_init: int = 625
    t_min: int = 20
    t_max: int = 980
    prompt_dropout: float = 0.1
    fake_loss_scale: float = 1.0
    gen_loss_scale: float = 1.0

    @classmethod
    def from_config(cls, method_cfg) -> MethodSettings:
        return cls(**{f: getattr(method_cfg, f) for f in cls.__dataclass_fields__})

    @property
    def uses_prompt_dropout(self) -> bool:
        return self.prompt_dropout > 0 and (self.cfg_train_fake != 1.0 or self.cfg_eval_fake != 1.0)


@dataclass
class StepNoise:
    """Everything random in one phase of one iteration, per sample."""

    z: torch.Tensor  # generator input noise [B, C, H, W]
    eps: torch.Tensor  # forward-process noise [B, C, H, W]
    t: torch.Tensor  # timesteps [B], long
    drop: torch.Tensor  # prompt dropout mask [B], bool (used by the fake step only)


def one_step_generate(gen: EpsFn, schedule: VPSchedule, z: torch.Tensor, cond: Cond, t_init: int) -> torch.Tensor:
    """``x_g = G(z, c)``: input ``sqrt(1 - abar) z`` (no signal term) at ``t_init``, denoised once."""
    t = torch.full((z.shape[0],), t_init, dtype=torch.long, device=z.device)
    _, s = schedule.coefficients(t, z)
    x_in = s * z
    return schedule.eps_to_x0(x_in, gen(x_in, t, cond), t)


def apply_prompt_dropout(cond: Cond, uncond: Cond, drop: torch.Tensor, settings: MethodSettings) -> Cond:
    """Replace the prompts selected by ``drop`` by "" when any fake-net guidance is active."""
    # NOTE: no `drop.any()` shortcut: it would force a host sync every micro-batch on GPU.
    if not settings.uses_prompt_dropout:
        return cond
    return where_cond(drop, uncond, cond)


def fake_step(
    gen: EpsFn, fake: EpsFn, schedule: VPSchedule, noise: StepNoise, cond: Cond, uncond: Cond,
    settings: MethodSettings, loss_normaliser: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of the fake score net ``psi``: DSM with CFG k1 on samples of the (frozen) generator."""
    cond = apply_prompt_dropout(cond, uncond, noise.drop, settings)
    with torch.no_grad():
        x_g = at_least_fp32(one_step_generate(gen, schedule, noise.z, cond, settings.t_init))
    x_t = schedule.add_noise(x_g, noise.eps, noise.t)
    eps_hat = guided_eps(fake, x_t, noise.t, cond, uncond, settings.cfg_train_fake)
    keep = finite_samples(x_g, eps_hat)
    # Mask BEFORE squaring: a non-finite sample must not reach the loss function at all. Squaring
    # first and masking after sends 0 * NaN = NaN back through the square's backward (d/dx x^2 =
    # 2x), which poisons every weight gradient of the micro-batch, not just the bad sample's.
    # The replaced sample's loss is then finite and masked_sum drops it (the reference drops it too).
    safe_eps_hat = torch.where(keep.view(-1, *([1] * (eps_hat.dim() - 1))), eps_hat, torch.zeros_like(eps_hat))
    per_sample = fake_score_loss(safe_eps_hat, noise.eps)
    loss = masked_sum(per_sample, keep) * (settings.fake_loss_scale / loss_normaliser)
    stats = {"loss_fake": loss.detach(), "dropped_fake": (~keep).sum().detach()}
    return loss, stats


def generator_step(
    gen: EpsFn, fake: EpsFn, teacher: EpsFn, schedule: VPSchedule, noise: StepNoise, cond: Cond,
    uncond: Cond, settings: MethodSettings, loss_normaliser: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of the generator ``theta``.

    NOTE: ``fake`` and ``teacher`` must have frozen parameters (requires_grad False) but are
    evaluated WITH autograd: the SiD gradient reaches theta through x_t into both UNets.
    Running them under no_grad or detaching y_real / y_fake is a different (DMD-like) method.
    """
    x_g = at_least_fp32(one_step_generate(gen, schedule, noise.z, cond, settings.t_init))
    x_t = schedule.add_noise(x_g, noise.eps, noise.t)
    y_fake = schedule.eps_to_x0(x_t, guided_eps(fake, x_t, noise.t, cond, uncond, settings.cfg_eval_fake), noise.t)
    y_real = schedule.eps_to_x0(
        x_t, guided_eps(teacher, x_t, noise.t, cond, uncond, settings.cfg_eval_real), noise.t
    )
    keep = finite_samples(x_g, y_real, y_fake)
    # Dropped samples still enter the loss function (masked to 0 below); keep them finite so
    # the masked branch cannot produce NaN * 0 in the backward pass.
    safe = [torch.where(keep.view(-1, 1, 1, 1), v, torch.zeros_like(v)) for v in (x_g, y_real, y_fake)]
    per_sample, w = sid_generator_loss(*safe, alpha=settings.alpha)
    loss = masked_sum(per_sample, keep) * (settings.gen_loss_scale / loss_normaliser)
    stats = {
        "loss_gen": loss.detach(),
        "dropped_gen": (~keep).sum().detach(),
        # A masked mean, not w[keep], so logging needs no host sync.
        "w_mean": (torch.where(keep, w, torch.zeros_like(w)).sum() / keep.sum().clamp_min(1)).detach(),
    }
    return loss, stats
