"""SiD (SiD-LSG, and its flow-matching / K-step form SiD-DiT): one fake-score step and one
generator step, on networks and tensors only.

No DeepSpeed, no data, no I/O, no model family here: the caller passes prediction functions
(``guidance.EpsFn``: eps for a VP teacher, velocity for a flow teacher), the ``NoiseSchedule``
that converts their predictions to x0 (``sidscale.core.schedule``), the noise of the step
(``StepNoise``) and the conditionings, and gets back a scalar loss to backpropagate plus
detached statistics for logging. The normaliser of the loss is the per-rank batch, given by the
caller (``loss_normaliser``), so micro-batch sums add up to docs/method.md 5's "summed over latent
elements and micro-batches, divided by the per-rank batch".

K-step generators (``generator_steps`` = K, docs/flow_matching.md 1.2): step i denoises
``add_noise(x0_{i-1}, eps_i, level_i)`` (step 0: ``noise_only(z)``), eps_i per ``noise_type``
(``NOISE_TYPES``); each iteration runs the first k steps for one k in 1..K shared by all ranks,
the first k-1 without gradient, and the loss is on step k's output. K = 1 is SiD-LSG's one-step
generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sidscale.core.cond import Cond, where_cond
from sidscale.core.noise import StepNoise
from sidscale.method.guards import finite_samples, masked_mean, masked_sum
from sidscale.method.guidance import EpsFn, fake_eps, guided_eps
from sidscale.method.losses import at_least_fp32, canonical_weighting, fake_score_loss, sid_generator_loss

NoiseSchedule = Any  # sidscale.families.base.NoiseSchedule (VPSchedule, FlowSchedule)

# The noise eps_i that step i >= 1 of a K-step generator adds to the previous step's x0 (SiD-DiT's
# --noise_type): fresh, a new draw per step (StepNoise.z_more); fixed, the first step's z again; ddim,
# the noise the previous step's input and prediction imply (``schedule.implied_noise``), detached.
NOISE_TYPES = ("fresh", "fixed", "ddim")


@dataclass(frozen=True)
class MethodSettings:
    """The method knobs of docs/method.md (a view of ``config.MethodConfig``)."""

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
    # K-step generator and the flow-matching knobs (docs/flow_matching.md 1.2-1.5); the VP schedule reads
    # t_init / t_min / t_max, the flow schedule sigma_init / sigma_logit_*.
    generator_steps: int = 1
    gen_weighting: str = "sid_legacy"  # losses.GEN_WEIGHTINGS (the authors' spellings are stored as ours)
    sigma_init: float = 1.0
    sigma_logit_mean: float = 0.6931471805599453  # ln 2
    sigma_logit_std: float = 1.6
    noise_type: str = "fresh"  # NOISE_TYPES: the noise of K-step generator steps 2..K
    fake_text: bool = True  # false: Zero-CFG's text-free fake net (one call on the empty prompt)
    adversarial: Any = None  # config.AdversarialConfig (duck-typed: the method imports no config)

    def __post_init__(self) -> None:
        # frozen: the canonical name is written once here, so no later code sees an alias
        object.__setattr__(self, "gen_weighting", canonical_weighting(self.gen_weighting))
        if self.noise_type not in NOISE_TYPES:
            raise ValueError(f"noise_type {self.noise_type!r}; expected one of {', '.join(NOISE_TYPES)}")

    @classmethod
    def from_config(cls, method_cfg) -> MethodSettings:
        return cls(**{f: getattr(method_cfg, f) for f in cls.__dataclass_fields__})

    @property
    def uses_prompt_dropout(self) -> bool:
        # a text-free fake net (fake_text false) never sees the prompts, so there is nothing to drop
        return (self.fake_text and self.prompt_dropout > 0
                and (self.cfg_train_fake != 1.0 or self.cfg_eval_fake != 1.0))


def generate(gen: EpsFn, schedule: NoiseSchedule, noises: Sequence[torch.Tensor], cond: Cond,
             levels: Sequence, noise_type: str = "fresh") -> torch.Tensor:
    """Run ``len(noises)`` steps of the K-step generator at ``levels`` (``generator_levels``), return
    the last step's x0. Only the last network call records a graph (when grad is enabled at all):
    the earlier steps' outputs enter the last one as constants (docs/flow_matching.md 1.2).
    ``noise_type`` (``NOISE_TYPES``) picks step i's noise; fixed and ddim read only ``noises[0]`` (the
    caller still draws all of them, so the hashed draws of every type are the same)."""
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"noise_type {noise_type!r}; expected one of {', '.join(NOISE_TYPES)}")
    grad = torch.is_grad_enabled()
    n = len(noises)
    x0 = x_in = t = noises[0]
    for i, drawn in enumerate(noises):
        eps_i = drawn if i == 0 or noise_type == "fresh" else noises[0]
        if i > 0 and noise_type == "ddim":
            # step i-1's input and prediction, as constants (they already are: that step ran without a graph)
            eps_i = schedule.implied_noise(x_in, x0, t).detach()
        t = schedule.level_tensor(levels[i], drawn.shape[0], drawn.device)
        with torch.set_grad_enabled(grad and i == n - 1):
            x_in = schedule.noise_only(eps_i, t) if i == 0 else schedule.add_noise(x0, eps_i, t)
            x0 = schedule.to_x0(x_in, gen(x_in, t, cond), t)
    return x0


def one_step_generate(gen: EpsFn, schedule: NoiseSchedule, z: torch.Tensor, cond: Cond, level) -> torch.Tensor:
    """``x_g = G(z, c)``: input ``noise_only(z)`` (no signal term) at ``level`` (VP: t_init), denoised once."""
    return generate(gen, schedule, [z], cond, [level])  # one step: every noise type is the same


def multi_step_generate(gen: EpsFn, schedule: NoiseSchedule, noises: Sequence[torch.Tensor], cond: Cond,
                        settings: MethodSettings) -> torch.Tensor:
    """All ``settings.generator_steps`` steps (sampling): ``noises`` holds one noise per step."""
    levels = schedule.generator_levels(settings, settings.generator_steps)
    return generate(gen, schedule, list(noises)[:settings.generator_steps], cond, levels, settings.noise_type)


def apply_prompt_dropout(cond: Cond, uncond: Cond, drop: torch.Tensor, settings: MethodSettings) -> Cond:
    """Replace the prompts selected by ``drop`` by "" when any fake-net guidance is active."""
    # NOTE: no `drop.any()` shortcut: it would force a host sync every micro-batch on GPU.
    if not settings.uses_prompt_dropout:
        return cond
    return where_cond(drop, uncond, cond)


def _generator_output(gen: EpsFn, schedule: NoiseSchedule, noise: StepNoise, cond: Cond,
                      settings: MethodSettings, k: int) -> torch.Tensor:
    if not 1 <= k <= settings.generator_steps:
        raise ValueError(f"generator step k = {k}: expected 1..{settings.generator_steps}")
    levels = schedule.generator_levels(settings, settings.generator_steps)
    return at_least_fp32(generate(gen, schedule, noise.generator_noises(k), cond, levels, settings.noise_type))


def fake_step(
    gen: EpsFn, fake: EpsFn, schedule: NoiseSchedule, noise: StepNoise, cond: Cond, uncond: Cond,
    settings: MethodSettings, loss_normaliser: float, k: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of the fake score net ``psi``: DSM with CFG k1 on samples of the (frozen) generator
    (its k-step output). The target is the schedule's: eps (VP) or the velocity eps - x0 (flow)."""
    cond = apply_prompt_dropout(cond, uncond, noise.drop, settings)
    with torch.no_grad():
        x_g = _generator_output(gen, schedule, noise, cond, settings, k)
    x_t = schedule.add_noise(x_g, noise.eps, noise.t)
    eps_hat = fake_eps(fake, x_t, noise.t, cond, uncond, settings.cfg_train_fake, settings.fake_text)
    keep = finite_samples(x_g, eps_hat)
    # Mask BEFORE squaring: a non-finite sample must not reach the loss function at all. Squaring
    # first and masking after sends 0 * NaN = NaN back through the square's backward (d/dx x^2 =
    # 2x), which poisons every weight gradient of the micro-batch, not just the bad sample's.
    # The replaced sample's loss is then finite and masked_sum drops it (the reference drops it too).
    safe_eps_hat = torch.where(keep.view(-1, *([1] * (eps_hat.dim() - 1))), eps_hat, torch.zeros_like(eps_hat))
    per_sample = fake_score_loss(safe_eps_hat, schedule.dsm_target(x_g, noise.eps, noise.t))
    loss = masked_sum(per_sample, keep) * (settings.fake_loss_scale / loss_normaliser)
    stats = {"loss_fake": loss.detach(), "dropped_fake": (~keep).sum().detach()}
    return loss, stats


def generator_step(
    gen: EpsFn, fake: EpsFn, teacher: EpsFn, schedule: NoiseSchedule, noise: StepNoise, cond: Cond,
    uncond: Cond, settings: MethodSettings, loss_normaliser: float, k: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of the generator ``theta`` on its k-step output (gradient through step k only).

    NOTE: ``fake`` and ``teacher`` must have frozen parameters (requires_grad False) but are
    evaluated WITH autograd: the SiD gradient reaches theta through x_t into both networks.
    Running them under no_grad or detaching y_real / y_fake is a different (DMD-like) method.
    """
    x_g, y_real, y_fake = generator_predictions(gen, fake, teacher, schedule, noise, cond, uncond, settings, k)
    keep = finite_samples(x_g, y_real, y_fake)
    per_sample, w = masked_sid_generator_loss(x_g, y_real, y_fake, keep, schedule, noise.t, settings)
    loss = masked_sum(per_sample, keep) * (settings.gen_loss_scale / loss_normaliser)
    stats = {
        "loss_gen": loss.detach(),
        "dropped_gen": (~keep).sum().detach(),
        "w_mean": masked_mean(w, keep),
    }
    return loss, stats


def generator_predictions(
    gen: EpsFn, fake: EpsFn, teacher: EpsFn, schedule: NoiseSchedule, noise: StepNoise, cond: Cond,
    uncond: Cond, settings: MethodSettings, k: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_g, y_real, y_fake)`` of the generator step: the k-step output and both networks' x0 estimates at
    its noised copy, with the graph through both (one fake-net call, then one teacher call)."""
    x_g = _generator_output(gen, schedule, noise, cond, settings, k)
    x_t = schedule.add_noise(x_g, noise.eps, noise.t)
    y_fake = schedule.to_x0(
        x_t, fake_eps(fake, x_t, noise.t, cond, uncond, settings.cfg_eval_fake, settings.fake_text), noise.t
    )
    y_real = schedule.to_x0(
        x_t, guided_eps(teacher, x_t, noise.t, cond, uncond, settings.cfg_eval_real), noise.t
    )
    return x_g, y_real, y_fake


def masked_sid_generator_loss(
    x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, keep: torch.Tensor, schedule: NoiseSchedule,
    t: torch.Tensor, settings: MethodSettings,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sid_generator_loss`` per sample with the samples outside ``keep`` zeroed first, and its normaliser w
    (sid_legacy) or multiplier lambda (the other weightings; sigma from the loss level ``t``)."""
    # Dropped samples still enter the loss function (masked to 0 by the caller's sum); keep them finite
    # so the masked branch cannot produce NaN * 0 in the backward pass.
    safe = [torch.where(keep.view(-1, 1, 1, 1), v, torch.zeros_like(v)) for v in (x_g, y_real, y_fake)]
    sigma = (None if settings.gen_weighting == "sid_legacy"
             else schedule.flow_sigma(t, x_g).reshape(-1).expand(x_g.shape[0]))
    return sid_generator_loss(*safe, alpha=settings.alpha, weighting=settings.gen_weighting, sigma=sigma)
