"""Toy quality: Frechet distance of the one-step student and of the teacher's multi-step sampler to
exact samples of the toy Gaussian mixture (the ground truth the toy teacher was fitted on).

The teacher's sampler is its family's (``ModelFamily.teacher_sampler``): DDIM for the VP toy
teacher, the flow Euler sampler (DDIM in the flow parameterisation) for ``toy_flow``; the result
keys keep the name ``*_teacher_ddim`` for both."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from sidscale.core.io import atomic_write_json
from sidscale.distributed import comm
from sidscale.eval.frechet import toy_frechet
from sidscale.families.base import Teacher
from sidscale.families.toy.fit import load_toy_mixture
from sidscale.families.toy.mixture import ToyMixture
from sidscale.method.sid_lsg import MethodSettings, multi_step_generate
from sidscale.sample import seeded_generator_noises
from sidscale.terminal import progress, sampler_title, teacher_sampler_name, toy_eval_scalars
from sidscale.testing import fault_injection


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
    ``settings``: the generator's K steps, start level and noise type (default: one step at ``t_init``);
    the ``*_one_step`` keys then hold the K-step student's numbers.

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
    return ToyEvaluation(trainer.outputs).run()


class ToyEvaluation:
    """One-step student vs the teacher's DDIM sampler, both against exact mixture samples (toy teachers);
    the teacher's numbers cached beside the toy teacher."""

    TEACHER_KEYS = ("frechet_teacher_ddim", "prompt_accuracy_teacher_ddim", "colour_accuracy_teacher_ddim")

    def __init__(self, outputs: Any) -> None:
        self.outputs, self.trainer = outputs, outputs.trainer

    def run(self) -> dict | None:
        r = self.trainer
        teacher_numbers = None
        if r.teacher_engine is not None and r.cfg.eval.teacher_steps > 0:
            # A partitioned teacher samples on every rank together (its calls are collectives), unless
            # rank 0 has its numbers cached; rank 0 then only evaluates the student.
            if comm.decide_on_rank0(lambda: self.cached_teacher_numbers()[1] is None):
                ev = r.cfg.eval
                teacher_numbers = toy_quality(r.teacher, load_toy_mixture(r.teacher.path), None,
                                              ev.num_samples, ev.teacher_steps, r.settings.cfg_eval_real,
                                              r.settings.t_init, settings=r.settings)
        with self.outputs.ema_network() as net:
            def evaluate() -> dict:  # rank 0 (minutes on a busy CPU machine)
                fault_injection.maybe_fail("toy_eval", r.step, r.rank)
                return self.evaluate(net, teacher_numbers)

            result = comm.broadcast_object_after_long_work(evaluate, what="the toy evaluation")
        return result if r.dist.is_main else None

    def cached_teacher_numbers(self) -> tuple[Path, dict | None]:
        """The teacher's toy-evaluation cache file and its numbers (None: not cached, or an older format)."""
        r = self.trainer
        ev = r.cfg.eval
        # The teacher's DDIM number depends only on the teacher and the evaluation settings (its
        # reference samples are seeded), and costs 2 x teacher_steps forwards per sample: compute it
        # once per teacher and setting, cache it beside the toy teacher.
        cache = Path(r.cfg.teacher.cache_dir).expanduser() / "toy-eval-cache" / (hashlib.sha256(json.dumps(
            [str(Path(r.teacher.path).resolve()), ev.num_samples, ev.teacher_steps, r.settings.cfg_eval_real],
        ).encode()).hexdigest()[:16] + ".json")
        try:  # rank 0 only, inside decide_on_rank0: a torn cache file is a cache miss, not an exception
            cached = json.loads(cache.read_text()) if cache.is_file() else None
        except (OSError, ValueError):
            cached = None
        if cached is not None and not all(k in cached for k in self.TEACHER_KEYS):
            cached = None  # written by an older version: recompute
        return cache, cached

    def evaluate(self, net: torch.nn.Module, teacher_numbers: dict | None = None) -> dict:
        """``teacher_numbers``: the teacher's part, already computed (by every rank, partitioned teacher)."""
        r = self.trainer
        ev, s = r.cfg.eval, r.settings
        # NOTE: the other ranks only wait here, so rank 0 may use every core of the node (CPU runs
        # are usually launched with OMP_NUM_THREADS=1 per rank).
        threads = torch.get_num_threads()
        torch.set_num_threads(max(threads, len(os.sched_getaffinity(0))))
        cache, cached = self.cached_teacher_numbers()
        keys = self.TEACHER_KEYS
        if cached is None and teacher_numbers is not None:
            cached = {k: teacher_numbers[k] for k in keys}
            with contextlib.suppress(OSError):  # a read-only cache dir only costs the recomputation
                atomic_write_json(cache, cached)
        try:
            # NOTE: the teacher runs here on rank 0 alone only when it is replicated (a partitioned
            # teacher's numbers come in ``teacher_numbers`` or from the cache).
            steps = 0 if cached or r.teacher_engine is not None else ev.teacher_steps
            result = toy_quality(r.teacher, load_toy_mixture(r.teacher.path), net, ev.num_samples,
                                 steps, s.cfg_eval_real, s.t_init, settings=s)
        finally:
            torch.set_num_threads(threads)
        if cached:
            result.update({k: cached[k] for k in keys})
        elif "frechet_teacher_ddim" in result:
            with contextlib.suppress(OSError):  # a read-only cache dir only costs the recomputation
                atomic_write_json(cache, {k: result[k] for k in keys})
        sampler = teacher_sampler_name(r.schedule)
        result.update(step=r.step, num_samples=ev.num_samples, teacher_steps=ev.teacher_steps,
                      teacher_cfg=s.cfg_eval_real, generator_steps=s.generator_steps, noise_type=s.noise_type,
                      teacher_sampler=sampler)
        atomic_write_json(r.run_dir / "toy_eval.json", result)
        r.logger.scalars(r.step, toy_eval_scalars(result, result["generator_steps"], sampler, ev.teacher_steps))
        teacher_part = (f" | teacher {sampler_title(sampler)} {ev.teacher_steps} steps "
                        f"cfg {s.cfg_eval_real} "
                        f"{result['frechet_teacher_ddim']:.4f} (prompt / colour accuracy "
                        f"{result['prompt_accuracy_teacher_ddim']:.0%} / {result['colour_accuracy_teacher_ddim']:.0%})"
                        if "frechet_teacher_ddim" in result else "")
        r.logger.write(
            f"toy Frechet distance to exact samples ({ev.num_samples} samples): "
            f"{s.generator_steps}-step student (EMA) "
            f"{result['frechet_one_step']:.4f} (prompt / colour accuracy {result['prompt_accuracy_one_step']:.0%} / "
            f"{result['colour_accuracy_one_step']:.0%})"
            f"{teacher_part} | exact-vs-exact floor {result['frechet_exact_vs_exact']:.4f}")
        return result
