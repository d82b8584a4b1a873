"""Data-aided adversarial SiD (SiDA; SiD-DiT's "Diffusion GAN"): the two added terms and their
schedule, on networks and tensors only (docs/adversarial.md).

The discriminator is the fake score network itself: a read-out of its own features pooled to logits
(``families/shared/readout.py``, passed in as ``tap``), so it trains with the fake net's optimizer in the
fake phase and adds no parameter. Real latents are noised with the SAME level t and noise eps as the
generated sample of the same index (so the discriminator compares like with like).

Per sample b (CHW = latent elements, ``sp`` = softplus, ``c`` = ``logit_clamp``, means over the logits j):
- discriminator (fake phase, added to the DSM loss):
  ``L_D = CHW * 1/2 * [mean_j sp(-clamp(l_real, c)) + mean_j sp(clamp(l_fake, c))]`` (binary cross-entropy,
  real = 1, generated = 0), scaled by ``disc_scale`` and divided by the per-rank batch like the DSM sum;
- generator (non-saturating, label 1, weighted by the SiD loss's own per-sample lambda):
  ``L_adv = lambda * CHW * mean_j sp(-clamp(l_gen, c))``, scaled by ``gen_scale``, from the same fake-net
  call that gives y_fake (no extra network call);
- schedule in images seen n (kimg = 1000 images, strict ``>`` as the authors): no generator step while
  ``n <= disc_warmup_kimg`` (the discriminator warms up alone), SiD loss only while ``n <= mix_after_kimg``,
  then ``(1 - mix_weight) L_sid + mix_weight L_adv``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from sidscale.core.cond import Cond
from sidscale.core.noise import StepNoise
from sidscale.method.guards import finite_samples, masked_mean, masked_sum
from sidscale.method.guidance import EpsFn
from sidscale.method.sid_lsg import (
    MethodSettings,
    apply_prompt_dropout,
    fake_step,
    generator_predictions,
    masked_sid_generator_loss,
)

Tap = Any  # families.shared.readout.FeatureTap: ``logits(call, batch) -> (output, logits [batch, J])``


def generator_active(adv: Any, images_seen: int) -> bool:
    """Whether the generator steps this iteration (``images_seen``: before it): after the warm-up."""
    return images_seen > adv.disc_warmup_kimg * 1000


def adversarial_mix(adv: Any, images_seen: int) -> float:
    """The weight of the adversarial term in the generator loss this iteration (0 before ``mix_after_kimg``)."""
    return adv.mix_weight if images_seen > adv.mix_after_kimg * 1000 else 0.0


def disc_loss_per_sample(l_real: torch.Tensor, l_fake: torch.Tensor, clamp: float, elements: int) -> torch.Tensor:
    """``CHW/2 [mean sp(-l_real) + mean sp(l_fake)]`` per sample, logits clamped to [-clamp, clamp]."""
    l_real, l_fake = l_real.float().clamp(-clamp, clamp), l_fake.float().clamp(-clamp, clamp)
    return elements * 0.5 * (F.softplus(-l_real).flatten(1).mean(1) + F.softplus(l_fake).flatten(1).mean(1))


def gen_adv_loss_per_sample(l_gen: torch.Tensor, clamp: float, elements: int) -> torch.Tensor:
    """``CHW mean sp(-l_gen)`` per sample (the non-saturating generator loss), before the weighting lambda."""
    return elements * F.softplus(-l_gen.float().clamp(-clamp, clamp)).flatten(1).mean(1)


def conditional_call(fake: EpsFn, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, scale: float) -> torch.Tensor:
    """One conditional call of the fake net (the real samples: no CFG). A prediction function that takes
    its guidance from the call (FLUX's official mode: an embedding) gets ``scale`` through ``conditional``."""
    conditional = getattr(fake, "conditional", None)
    return conditional(x_t, t, cond, scale) if conditional is not None else fake(x_t, t, cond)


def adversarial_fake_step(
    gen: EpsFn, fake: EpsFn, tap: Tap, schedule: Any, noise: StepNoise, cond: Cond, uncond: Cond,
    real_x: torch.Tensor, real_cond: Cond, settings: MethodSettings, loss_normaliser: float, k: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The fake net's DSM loss (``sid_lsg.fake_step``, unchanged) plus the discriminator's BCE on the
    same generated samples (logits from the DSM call itself) and on the real samples ``real_x`` with
    their captions (one conditional call, no CFG). The real captions drop out with the same mask."""
    adv = settings.adversarial
    batch = noise.eps.shape[0]
    # the generated samples' logits: read in fake_step's one (guided) fake-net call
    (dsm_loss, stats), l_fake = tap.logits(
        lambda: fake_step(gen, fake, schedule, noise, cond, uncond, settings, loss_normaliser=loss_normaliser, k=k),
        batch)
    # the real captions drop out with the generated sample's mask; Zero-CFG's fake net never sees text
    real_cond = apply_prompt_dropout(real_cond, uncond, noise.drop, settings) if settings.fake_text else uncond
    x_t_real = schedule.add_noise(real_x.to(noise.eps.dtype), noise.eps, noise.t)
    _, l_real = tap.logits(lambda: conditional_call(fake, x_t_real, noise.t, real_cond, settings.cfg_train_fake),
                           batch)
    keep = finite_samples(l_fake, l_real)
    zero = torch.zeros((), device=l_fake.device)
    safe_real = torch.where(keep.view(-1, 1), l_real, zero)  # masked before the loss: no NaN * 0 in backward
    safe_fake = torch.where(keep.view(-1, 1), l_fake, zero)
    per_sample = disc_loss_per_sample(safe_real, safe_fake, adv.logit_clamp, real_x[0].numel())
    disc = masked_sum(per_sample, keep) * (adv.disc_scale / loss_normaliser)
    stats.update({
        "loss_disc": disc.detach(),
        # the share of samples the discriminator gets right (mean logit's sign); masked means: no host sync
        "disc_real_acc": masked_mean(l_real.detach().mean(1) > 0, keep),
        "disc_fake_acc": masked_mean(l_fake.detach().mean(1) < 0, keep),
        "dropped_disc": (~keep).sum().detach(),
    })
    return dsm_loss + disc, stats


def adversarial_generator_step(
    gen: EpsFn, fake: EpsFn, teacher: EpsFn, tap: Tap, schedule: Any, noise: StepNoise, cond: Cond,
    uncond: Cond, settings: MethodSettings, loss_normaliser: float, mix: float, k: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(1 - mix) L_sid + mix L_adv``: the SiD generator loss (as ``sid_lsg.generator_step``) and the
    non-saturating adversarial term from the logits of the same fake-net call, both weighted per
    sample by the SiD weighting lambda. The gradient reaches theta through x_t into the teacher and
    the fake net (frozen, in the graph), and through the fake net's features for the adversarial term."""
    adv = settings.adversarial
    batch = noise.eps.shape[0]
    # the logits of the one fake-net call among the predictions (the generator and the teacher are other nets)
    (x_g, y_real, y_fake), l_gen = tap.logits(
        lambda: generator_predictions(gen, fake, teacher, schedule, noise, cond, uncond, settings, k), batch)
    keep = finite_samples(x_g, y_real, y_fake, l_gen)
    sid, w = masked_sid_generator_loss(x_g, y_real, y_fake, keep, schedule, noise.t, settings)
    lam = 1 / w if settings.gen_weighting == "sid_legacy" else w  # the SiD term's own lambda (w: its normaliser)
    safe_l_gen = torch.where(keep.view(-1, 1), l_gen, torch.zeros_like(l_gen))
    adv_term = lam * gen_adv_loss_per_sample(safe_l_gen, adv.logit_clamp, x_g[0].numel())
    loss_sid = masked_sum(sid, keep) * (settings.gen_loss_scale / loss_normaliser)
    loss_adv = masked_sum(adv_term, keep) * (adv.gen_scale / loss_normaliser)
    loss = loss_sid if mix == 0.0 else (1.0 - mix) * loss_sid + mix * loss_adv
    stats = {
        "loss_gen": loss.detach(),
        "loss_gen_sid": loss_sid.detach(),
        "loss_gen_adv": loss_adv.detach(),
        "adv_mix": torch.full((), mix, device=loss.device),
        "dropped_gen": (~keep).sum().detach(),
        "w_mean": masked_mean(w, keep),
    }
    return loss, stats
