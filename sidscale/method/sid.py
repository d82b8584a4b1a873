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

    def __init__(self, settings: MethodSettings, train_cfg: Any, ema: Any) -> None:
        self.settings, self.train_cfg, self.ema = settings, train_cfg, ema
        self.phases = (
            Phase("fake", PHASE_FAKE, trains="fake", loss=self.fake_loss,
                  stat_reduce={"loss_fake": MEAN, "dropped_fake": SUM}),
            # "teacher" frozen too: a partitioned teacher's engine releases what its backward left gathered
            Phase("gen", PHASE_GEN, trains="generator", loss=self.generator_loss, frozen=("fake", "teacher"),
                  stat_reduce={"loss_gen": MEAN, "w_mean": MEAN, "dropped_gen": SUM}),
        )

    def fake_loss(self, fns: PredictionFns, batch: Batch, k: int, normaliser: float
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return fake_step(fns.gen_module_fn, fns.fake_engine_fn, fns.schedule, batch.noise, batch.cond, batch.uncond,
                         self.settings, loss_normaliser=normaliser, k=k)

    def generator_loss(self, fns: PredictionFns, batch: Batch, k: int, normaliser: float
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return generator_step(fns.gen_engine_fn, fns.fake_module_fn, fns.teacher_fn, fns.schedule, batch.noise,
                              batch.cond, batch.uncond, self.settings, loss_normaliser=normaliser, k=k)

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
