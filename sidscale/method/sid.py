"""SiD as the trainer runs it: the phase order, the K-step k draw, the fp16 skip coupling, the EMA.

One iteration (docs/method.md 4, in order): a fake-score step on ``train.global_batch`` samples of the
frozen generator, then a generator step on fresh samples with the fake net frozen but still in the
autograd graph, each accumulated over micro-batches; then the generator's EMA. The losses themselves
are ``method/sid_lsg.py`` (networks and tensors only).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sidscale.core.ema import ema_beta
from sidscale.core.noise import PHASE_FAKE, PHASE_GEN, draw_step_noise, generator_step_count
from sidscale.method.adversarial import (
    adversarial_fake_step,
    adversarial_generator_step,
    adversarial_mix,
    generator_active,
)
from sidscale.method.base import MEAN, SUM, Batch, Phase, PredictionFns
from sidscale.method.sid_lsg import MethodSettings, fake_step, generator_step


class SiD:
    """SiD-LSG / SiD-DiT (``method.name = sid_lsg``)."""

    # fp16 overflow in the fake engine: the generator skips this iteration too (and so does the EMA)
    skip_later_phases_on_overflow = True
    # how each statistic is logged (metrics.step_scalars); the generator's are absent in a window where
    # every generator phase was skipped
    stat_tags = {
        "loss_fake": ("loss/fake", False, None), "loss_gen": ("loss/gen", False, float("nan")),
        "w_mean": ("gen/w_mean", False, float("nan")),
        "dropped_fake": ("nan/dropped_fake", True, None), "dropped_gen": ("nan/dropped_gen", True, 0.0),
        "skipped_fake": ("fp16/skipped_fake", False, None), "skipped_gen": ("fp16/skipped_gen", False, None),
        "time_fake": ("time/fake_step_s", False, None), "time_gen": ("time/gen_step_s", False, None),
    }
    # method.adversarial.enabled (method/adversarial.py): the discriminator's and the generator's added terms
    adversarial_stat_tags = {
        "loss_disc": ("adversarial/loss_disc", False, None),
        "disc_real_acc": ("adversarial/disc_real_acc", False, None),
        "disc_fake_acc": ("adversarial/disc_fake_acc", False, None),
        "dropped_disc": ("nan/dropped_disc", True, None),
        "loss_gen_sid": ("adversarial/loss_gen_sid", False, float("nan")),
        "loss_gen_adv": ("adversarial/loss_gen_adv", False, float("nan")),
        "adv_mix": ("adversarial/mix_weight", False, float("nan")),
    }

    def __init__(self, settings: MethodSettings, train_cfg: Any, ema: Any) -> None:
        self.settings, self.train_cfg, self.ema = settings, train_cfg, ema
        self.adversarial = settings.adversarial if getattr(settings.adversarial, "enabled", False) else None
        self.mix = 0.0  # the adversarial term's weight this iteration (begin_step)
        fake_stats = {"loss_fake": MEAN, "dropped_fake": SUM}
        gen_stats = {"loss_gen": MEAN, "w_mean": MEAN, "dropped_gen": SUM}
        if self.adversarial is None:
            fake_loss, gen_loss, gen_active = self.fake_loss, self.generator_loss, None
        else:
            fake_loss, gen_loss = self.adversarial_fake_loss, self.adversarial_generator_loss
            gen_active = self.generator_active
            fake_stats.update(loss_disc=MEAN, disc_real_acc=MEAN, disc_fake_acc=MEAN, dropped_disc=SUM)
            gen_stats.update(loss_gen_sid=MEAN, loss_gen_adv=MEAN, adv_mix=MEAN)
            self.stat_tags = {**self.stat_tags, **self.adversarial_stat_tags}
        self.phases = (
            Phase("fake", PHASE_FAKE, trains="fake", loss=fake_loss, stat_reduce=fake_stats,
                  real_data=self.adversarial is not None),
            # "teacher" frozen too: a partitioned teacher's engine releases what its backward left gathered
            Phase("gen", PHASE_GEN, trains="generator", loss=gen_loss, frozen=("fake", "teacher"),
                  stat_reduce=gen_stats, active=gen_active),
        )

    def fake_loss(self, fns: PredictionFns, batch: Batch, k: int, normaliser: float
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return fake_step(fns.gen_module_fn, fns.fake_engine_fn, fns.schedule, batch.noise, batch.cond, batch.uncond,
                         self.settings, loss_normaliser=normaliser, k=k)

    def generator_loss(self, fns: PredictionFns, batch: Batch, k: int, normaliser: float
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return generator_step(fns.gen_engine_fn, fns.fake_module_fn, fns.teacher_fn, fns.schedule, batch.noise,
                              batch.cond, batch.uncond, self.settings, loss_normaliser=normaliser, k=k)

    def adversarial_fake_loss(self, fns: PredictionFns, batch: Batch, k: int, normaliser: float
                              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        real_x, real_cond = batch.real
        return adversarial_fake_step(fns.gen_module_fn, fns.fake_engine_fn, fns.fake_readout, fns.schedule,
                                     batch.noise, batch.cond, batch.uncond, real_x, real_cond, self.settings,
                                     loss_normaliser=normaliser, k=k)

    def adversarial_generator_loss(self, fns: PredictionFns, batch: Batch, k: int, normaliser: float
                                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return adversarial_generator_step(fns.gen_engine_fn, fns.fake_module_fn, fns.teacher_fn, fns.fake_readout,
                                          fns.schedule, batch.noise, batch.cond, batch.uncond, self.settings,
                                          loss_normaliser=normaliser, mix=self.mix, k=k)

    def generator_active(self, images_seen: int) -> bool:
        return generator_active(self.adversarial, images_seen)

    def begin_step(self, images_seen: int) -> None:
        self.mix = adversarial_mix(self.adversarial, images_seen) if self.adversarial is not None else 0.0

    def step_count(self, seed: int, step: int) -> int:
        # K-step generators: both phases run the first k of the K steps (the same k on every rank)
        return generator_step_count(seed, step, self.settings.generator_steps)

    def draw_noise(self, seed: int, step: int, noise_phase: int, indices: torch.Tensor, latent_shape: tuple,
                   schedule: Any, device: torch.device) -> Any:
        s = self.settings
        return draw_step_noise(seed, step, noise_phase, indices, latent_shape,
                               lambda g: schedule.draw_loss_level(s, g), s.prompt_dropout, device,
                               generator_steps=s.generator_steps)

    def after_step(self, applied: Mapping[str, bool], images_seen: int) -> None:
        """The generator's EMA, when its step was applied (``images_seen``: before this step)."""
        if applied.get("gen", False):
            tc = self.train_cfg
            self.ema.update(ema_beta(tc.global_batch, images_seen, tc.ema_halflife_kimg, tc.ema_rampup_ratio))
