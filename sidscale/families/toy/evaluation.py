"""Toy quality: Frechet distance of the one-step student and of the teacher's multi-step sampler to
exact samples of the toy Gaussian mixture (the ground truth the toy teacher was fitted on).

The teacher's sampler is its family's (``ModelFamily.teacher_sampler``): DDIM for the VP toy
teacher, the flow Euler sampler (DDIM in the flow parameterisation) for ``toy_flow``; the result
keys keep the name ``*_teacher_ddim`` for both."""

from __future__ import annotations

from typing import Any

import torch

from sidscale.distributed import comm
from sidscale.eval.frechet import toy_frechet
from sidscale.families.base import Teacher
from sidscale.families.toy.mixture import ToyMixture
from sidscale.method.sid_lsg import MethodSettings, multi_step_generate
from sidscale.sample import seeded_generator_noises
from sidscale.terminal import progress, sampler_title, teacher_sampler_name


def _accuracy(mixture: ToyMixture, x: torch.Tensor, prompts: list[str], name: str) -> dict[str, float]:
    return {f"{k}_accuracy_{name}": v for k, v in mixture.prompt_accuracy(x, prompts).items()}


@torch.no_grad()
def toy_quality(
    teacher: Teacher, mixture: ToyMixture, generator_unet: torch.nn.Module | None, num_samples: int,
    teacher_steps: int, teacher_cfg: float, t_init: int, seed: int = 0, batch: int = 250,
    settings: MethodSettings | None = None,
) -> dict[str, float]:
    """{"frechet_one_step", "frechet_teacher_ddim", "frechet_exact_vs_exact"}, prompts uniform over the toy
    prompts. The exact-vs-exact number (two independent exact sample sets) is the noise floor.
    ``settings``: the generator's K steps and start level (default: one step at ``t_init``); the
    ``*_one_step`` keys then hold the K-step student's numbers.

    The Frechet distance only sees the marginal over prompts; ``prompt_accuracy_*`` (the fraction of
    samples nearest to a component of their own prompt) and ``colour_accuracy_*`` (... of their own
    colour; ``ToyMixture.prompt_accuracy``) say whether each image follows its prompt.

    Each sampler gets a progress bar with ETA on rank 0 (a partitioned teacher samples on every rank)."""
    prompts = [mixture.prompts[i % len(mixture.prompts)] for i in range(num_samples)]
    reference = mixture.sample(prompts, torch.Generator().manual_seed(seed + 1))
    floor = mixture.sample(prompts, torch.Generator().manual_seed(seed + 2))
    out = {"frechet_exact_vs_exact": toy_frechet(floor, reference), **_accuracy(mixture, reference, prompts, "exact")}
    device = next(teacher.net.parameters()).device
    schedule, cond_fn = teacher.schedule, teacher.conditioner
    if generator_unet is not None:
        settings = settings or MethodSettings(t_init=t_init)
        gen = teacher.family.prediction_fn(generator_unet, schedule)
        xs = []
        bar = progress(num_samples, f"toy evaluation: {settings.generator_steps}-step student", comm.rank() == 0,
                       unit="img")
        for s in range(0, num_samples, batch):
            seeds = list(range(s, min(s + batch, num_samples)))
            noises = [n.to(device) for n in seeded_generator_noises(seeds, teacher.latent_shape,
                                                                    settings.generator_steps)]
            cond = cond_fn.encode(prompts[s:s + len(seeds)])
            xs.append(multi_step_generate(gen, schedule, noises, cond, settings).cpu())
            bar.update(len(seeds))
        bar.close()
        out["frechet_one_step"] = toy_frechet(torch.cat(xs), reference)
        out.update(_accuracy(mixture, torch.cat(xs), prompts, "one_step"))
    if teacher_steps > 0:
        g = torch.Generator().manual_seed(seed + 3)
        xs = []
        sampler = sampler_title(teacher_sampler_name(schedule))
        bar = progress(num_samples, f"toy evaluation: teacher {sampler} {teacher_steps} steps", comm.rank() == 0,
                       unit="img")
        for s in range(0, num_samples, batch):
            p = prompts[s:s + batch]
            xs.append(teacher.family.teacher_sampler(teacher, cond_fn.encode(p), cond_fn.empty(len(p)), teacher_cfg,
                                                     teacher_steps, g).cpu())
            bar.update(len(p))
        bar.close()
        out["frechet_teacher_ddim"] = toy_frechet(torch.cat(xs), reference)
        out.update(_accuracy(mixture, torch.cat(xs), prompts, "teacher_ddim"))
    return out


def end_of_run(trainer: Any) -> dict[str, float] | None:
    """The toy family's end-of-run hook (``FamilySpec.end_of_run``): the toy evaluation of the finished run
    when ``eval.num_samples`` asks for one (numbers on rank 0, None elsewhere)."""
    if trainer.cfg.eval.num_samples <= 0:
        return None
    return trainer.toy_evaluation()
