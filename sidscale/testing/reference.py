"""The plain single-process SiD loop: the numerical reference of the DeepSpeed trainer.

It stays small and obviously correct: fp32 copies of the teacher network as generator and fake
net, torch Adam, the whole global batch per step, the method's NaN guards, the EMA. Any family:
``prediction_fn`` wraps a network into the method's prediction function (default: a UNet's eps). The
DeepSpeed trainer (``sidscale.train``) must reproduce its weights in fp32 on the same prompts
and noises (tests/trainer/test_trainer_equivalence.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sidscale.core.ema import ema_beta, update_ema_
from sidscale.core.noise import PHASE_FAKE, PHASE_GEN, draw_step_noise, generator_step_count
from sidscale.families.unet_vp.adapter import UNetEps
from sidscale.method.guards import sanitize_grads_
from sidscale.method.sid_lsg import MethodSettings, fake_step, generator_step

# (step, phase, global sample indices) -> prompts
PromptFn = Callable[[int, int, Sequence[int]], list[str]]


@dataclass
class OptimSettings:
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float = 0.0


def make_adam(params, opt: OptimSettings) -> torch.optim.Adam:
    return torch.optim.Adam(
        params, lr=opt.lr, betas=(float(opt.betas[0]), float(opt.betas[1])), eps=opt.eps,
        weight_decay=opt.weight_decay,
    )


class ReferenceLoop:
    """One iteration = one fake-score step then one generator step, each on ``global_batch``."""

    def __init__(
        self, teacher_unet: torch.nn.Module, conditioner, schedule,
        settings: MethodSettings, gen_opt: OptimSettings, fake_opt: OptimSettings, global_batch: int,
        latent_shape: Sequence[int], seed: int, prompt_fn: PromptFn,
        ema_halflife_kimg: float = 50.0, ema_rampup_ratio: float = 0.05,
        prediction_fn: Callable | None = None,
    ):
        self.teacher_net = copy.deepcopy(teacher_unet).float().requires_grad_(False)
        self.gen_net = copy.deepcopy(teacher_unet).float().requires_grad_(True)
        self.fake_net = copy.deepcopy(teacher_unet).float().requires_grad_(True)
        self.ema = [p.detach().clone() for p in self.gen_net.parameters()]
        if prediction_fn is None:
            def prediction_fn(net, schedule, role="generator"):  # a UNet's eps: the role changes nothing
                return UNetEps(net, schedule)
        self.teacher, self.gen, self.fake = (prediction_fn(n, schedule, role=r) for n, r in
                                             ((self.teacher_net, "teacher"), (self.gen_net, "generator"),
                                              (self.fake_net, "fake")))
        self.gen_optim = make_adam(self.gen_net.parameters(), gen_opt)
        self.fake_optim = make_adam(self.fake_net.parameters(), fake_opt)
        self.conditioner, self.schedule, self.settings = conditioner, schedule, settings
        self.global_batch, self.latent_shape, self.seed = global_batch, tuple(latent_shape), seed
        self.prompt_fn = prompt_fn
        self.ema_halflife_kimg, self.ema_rampup_ratio = ema_halflife_kimg, ema_rampup_ratio
        self.step_index = 0

    def _inputs(self, phase: int):
        idx = list(range(self.global_batch))
        s = self.settings
        noise = draw_step_noise(self.seed, self.step_index, phase, idx, self.latent_shape,
                                lambda g: self.schedule.draw_loss_level(s, g), s.prompt_dropout,
                                generator_steps=s.generator_steps)
        cond = self.conditioner.encode(self.prompt_fn(self.step_index, phase, idx))
        return noise, cond, self.conditioner.empty(self.global_batch)

    def step(self) -> dict[str, float]:
        k = generator_step_count(self.seed, self.step_index, self.settings.generator_steps)
        noise, cond, uncond = self._inputs(PHASE_FAKE)
        loss_fake, stats = fake_step(self.gen, self.fake, self.schedule, noise, cond, uncond,
                                     self.settings, loss_normaliser=self.global_batch, k=k)
        self.fake_optim.zero_grad(set_to_none=True)
        loss_fake.backward()
        sanitize_grads_(self.fake_net.parameters())
        self.fake_optim.step()

        noise, cond, uncond = self._inputs(PHASE_GEN)
        self.fake_net.requires_grad_(False)
        loss_gen, gen_stats = generator_step(self.gen, self.fake, self.teacher, self.schedule, noise, cond,
                                             uncond, self.settings, loss_normaliser=self.global_batch, k=k)
        self.gen_optim.zero_grad(set_to_none=True)
        loss_gen.backward()
        self.fake_net.requires_grad_(True)
        sanitize_grads_(self.gen_net.parameters())
        self.gen_optim.step()

        beta = ema_beta(self.global_batch, self.step_index * self.global_batch,
                        self.ema_halflife_kimg, self.ema_rampup_ratio)
        update_ema_(self.ema, self.gen_net.parameters(), beta)
        self.step_index += 1
        stats.update(gen_stats)
        return {k: float(v) for k, v in stats.items()}

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        names = [n for n, _ in self.gen_net.named_parameters()]
        return dict(zip(names, (e.clone() for e in self.ema), strict=True))
