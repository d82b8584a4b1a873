"""What a run produces besides its checkpoints: the EMA generator as a network, previews, the export and
its sampling metadata, and the end-of-run evaluation.

``Outputs`` reads the trainer's changing state when it is called (the current step, the logger), so it
holds no copy of it; the only state of its own is the teacher's preview samples, made once.
NOTE: the pieces whose calls are collectives (the EMA, the generator engine) are attributes of ``self``
so that tests/test_error_path_collectives.py, which follows calls by name, sees them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sidscale.core.io import atomic_write_json
from sidscale.distributed import comm
from sidscale.distributed.sharded_ema import ema_swapped_into
from sidscale.export import export_generator, network_from_state
from sidscale.families.base import decode_in_chunks
from sidscale.method.sid_lsg import multi_step_generate
from sidscale.sample import seeded_generator_noises
from sidscale.terminal import sampler_title, teacher_sampler_name, toy_eval_scalars
from sidscale.testing import fault_injection


def sampling_meta(r: Any) -> dict:
    """How to sample the generator of run ``r`` (an export's ``sidscale.json``): the family's schedule as
    training used it (VP: the teacher's full alphas_cumprod; cfg.schedule is not read by training,
    so exporting it could give the sampler other betas), K and the generator's start level."""
    source = str(Path(r.teacher.path) / "scheduler" / "scheduler_config.json")
    s = r.settings
    return {
        "family": r.family.name, "generator_steps": s.generator_steps,
        "t_init": s.t_init, "sigma_init": s.sigma_init,
        "prediction_type": getattr(r.schedule, "prediction_type", "velocity"),
        "schedule": r.schedule.meta(source),
        "latent_shape": list(r.teacher.latent_shape), "scaling_factor": r.teacher.scaling_factor,
        "shift_factor": r.teacher.shift_factor,
        "teacher_path": str(r.teacher.path.resolve()), "teacher_kind": r.cfg.teacher.kind,
        "resolution": r.cfg.teacher.resolution, "step": r.step, "images_seen": r.images_seen,
        **r.family.sampling_extras(r.cfg),
    }


class Outputs:
    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.ema, self.gen_engine, self.dist = trainer.ema, trainer.gen_engine, trainer.dist
        self.preview_reference: torch.Tensor | None = None  # the teacher's preview samples (made once)
        self.teacher_reference_made = False

    # ----------------------------------------------------------------------------- the EMA as a network
    def sampling_meta(self) -> dict:
        return sampling_meta(self.trainer)

    @contextlib.contextmanager
    def ema_network(self) -> Iterator[torch.nn.Module | None]:
        """The EMA generator as a plain network (the teacher's class) on rank 0 in the teacher's dtype
        (fp32 for the toy teacher, so its evaluation is the fp32 EMA's), for the duration of the block;
        None on the other ranks (a collective: all ranks enter it). The export stays fp32 (``export``).

        NOTE: the full fp32 EMA is gathered into rank 0's host memory and the network exists on
        the device only inside the block, then is freed: a resident fp32 copy would cost 4 bytes
        per parameter on rank 0 for the whole run (~10 GB at SDXL size) for a preview every few
        hundred steps. The memory plan counts it as the ``preview`` phase.
        """
        r = self.trainer
        full = self.ema.gather_to_main()
        if not self.dist.is_main:
            yield None
            return
        net = network_from_state(r.family.network_class(), r.teacher.net.config, full)
        del full
        net = net.to(r.device, r.teacher.net.dtype).eval().requires_grad_(False)
        try:
            yield net
        finally:
            del net

    def ema_in_generator(self) -> Any:
        """ZeRO-3: the EMA swapped into the partitioned generator for a block, on every rank
        (``sharded_ema.ema_swapped_into``; the previews use it instead of a whole copy on rank 0)."""
        return ema_swapped_into(self.gen_engine, self.ema)

    def generate_with(self, net: torch.nn.Module, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """Latents of the K-step generator ``net`` (image i from seed i), as sampling an export does."""
        r = self.trainer
        noises = seeded_generator_noises(seeds, r.teacher.latent_shape, r.settings.generator_steps)
        cond = r.teacher.conditioner.encode(prompts)
        return multi_step_generate(r.family.prediction_fn(net, r.schedule), r.schedule,
                                   [n.to(r.device) for n in noises], cond, r.settings)

    # ----------------------------------------------------------------------------- previews
    @torch.no_grad()
    def preview(self) -> None:
        """Rank 0 writes the preview grid. ZeRO-3: every rank generates with the EMA swapped into the
        partitioned generator (``ema_in_generator``); else rank 0 generates with a copy (``ema_network``).
        A partitioned teacher draws its reference samples on every rank first (its calls are collectives)."""
        r = self.trainer
        if r.teacher_engine is not None:
            self._partitioned_teacher_reference()
        prompts, seeds = self._preview_prompts()
        if r.zero_stage == 3:
            with self.ema_in_generator() as net:
                x0 = self.generate_with(net, prompts, seeds)
            if r.dist.is_main:
                self._preview_with(x0, prompts, seeds)
            return
        with self.ema_network() as net:
            if net is not None:
                self._preview_with(self.generate_with(net, prompts, seeds), prompts, seeds)

    def _preview_prompts(self) -> tuple[list[str], list[int]]:
        p = self.trainer.cfg.preview
        prompts = [q for q in p.prompts for _ in range(p.seeds_per_prompt)]
        return prompts, list(range(len(prompts)))

    def _partitioned_teacher_reference(self) -> None:
        """The preview's teacher samples with a partitioned teacher, made once on EVERY rank: each of its
        calls gathers the teacher's layers from all ranks (a collective), so rank 0 cannot run it alone.
        Rank 0 keeps the images; no rank ever holds the whole teacher."""
        r = self.trainer
        steps = r.cfg.eval.teacher_steps
        if self.teacher_reference_made or steps <= 0:
            return
        prompts, seeds = self._preview_prompts()
        reference = self._teacher_samples(prompts, seeds, steps, r.settings.cfg_eval_real)
        self.preview_reference = reference if r.dist.is_main else None
        self.teacher_reference_made = True

    def _preview_with(self, x0: torch.Tensor, prompts: list[str], seeds: list[int]) -> None:
        r = self.trainer
        p, t = r.cfg.preview, r.teacher
        images = decode_in_chunks(r.family, t.vae, x0, t.scaling_factor, t.shift_factor)
        steps, guidance_scale = r.cfg.eval.teacher_steps, r.settings.cfg_eval_real
        if self.preview_reference is None and steps > 0:
            # a fixed reference for the eye: the teacher's multi-step sample of the same prompt and seed
            # (its x_T is the student's first noise), computed at the first preview only
            self.preview_reference = self._teacher_samples(prompts, seeds, steps, guidance_scale)
        headers = (f"student (EMA, {r.settings.generator_steps} step(s)) at step {r.step}",
                   f"teacher, {steps} steps, cfg {guidance_scale:g} (same prompt and seed)")
        r.logger.preview(r.step, images, p.prompts, p.seeds_per_prompt, self.preview_reference, headers)

    @torch.no_grad()
    def _teacher_samples(self, prompts: list[str], seeds: list[int], steps: int,
                         guidance_scale: float) -> torch.Tensor:
        """Decoded images of the teacher's own sampler (its family's), on the CPU. In chunks of half the
        preview (at least a micro-batch): with CFG's doubled batch, no larger than the student's preview."""
        r = self.trainer
        out, c, t = [], r.teacher.conditioner, r.teacher
        chunk = max(r.micro, len(prompts) // 2)
        for s in range(0, len(prompts), chunk):
            p, sd = prompts[s:s + chunk], seeds[s:s + chunk]
            x0 = r.family.teacher_sampler(t, c.encode(p), c.empty(len(p)), guidance_scale, steps,
                                          x_T=seeded_generator_noises(sd, t.latent_shape, 1)[0])
            out.append(decode_in_chunks(r.family, t.vae, x0, t.scaling_factor, t.shift_factor))
        return torch.cat(out)

    # ----------------------------------------------------------------------------- export
    def export(self) -> Path | None:
        r = self.trainer
        full = self.ema.gather_to_main()

        def write() -> Path:  # rank 0; a FLUX export writes tens of GB
            fault_injection.maybe_fail("export", r.step, r.rank)
            return export_generator(full, dict(r.teacher.net.config), r.run_dir / "export",
                                    self.sampling_meta(), link_frozen=r.cfg.train.export_link_frozen)

        out = comm.broadcast_object_after_long_work(write, what="the export")
        return out if r.dist.is_main else None


# ================================================================================= END OF RUN HOOK
def _end_of_run(trainer: Any) -> dict | None:
    """THE end-of-run hook (after the final checkpoint and the export; a collective: every rank calls it).

    NOTE: for now the toy evaluation of toy teachers; at merge this becomes the family spec's
    ``end_of_run`` hook, and ``ToyEvaluation`` moves to the toy family."""
    if trainer.cfg.teacher.is_toy and trainer.cfg.eval.num_samples > 0:
        return ToyEvaluation(trainer.outputs).run()
    return None


class ToyEvaluation:
    """One-step student vs the teacher's DDIM sampler, both against exact mixture samples (toy teachers);
    the teacher's numbers cached beside the toy teacher."""

    TEACHER_KEYS = ("frechet_teacher_ddim", "prompt_accuracy_teacher_ddim", "colour_accuracy_teacher_ddim")

    def __init__(self, outputs: Outputs) -> None:
        self.outputs, self.trainer = outputs, outputs.trainer

    def run(self) -> dict | None:
        r = self.trainer
        teacher_numbers = None
        if r.teacher_engine is not None and r.cfg.eval.teacher_steps > 0:
            # A partitioned teacher samples on every rank together (its calls are collectives), unless
            # rank 0 has its numbers cached; rank 0 then only evaluates the student.
            if comm.decide_on_rank0(lambda: self.cached_teacher_numbers()[1] is None):
                from sidscale.eval.toy_eval import toy_quality
                from sidscale.models.toy_teacher import load_toy_mixture

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
        from sidscale.eval.toy_eval import toy_quality
        from sidscale.models.toy_teacher import load_toy_mixture

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
                      teacher_cfg=s.cfg_eval_real, generator_steps=s.generator_steps, teacher_sampler=sampler)
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
