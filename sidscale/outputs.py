"""What a run produces besides its checkpoints: the EMA generator as a network, previews, the export and
its sampling metadata, and the end-of-run evaluation.

``Outputs`` reads the trainer's changing state when it is called (the current step, the logger), so it
holds no copy of it; the only state of its own is the teacher's preview samples, made once.
NOTE: the pieces whose calls are collectives (the EMA, the generator engine) are attributes of ``self``
so that tests/robustness/test_error_path_collectives.py, which follows calls by name, sees them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sidscale.distributed import comm
from sidscale.distributed.sharded_ema import ema_swapped_into
from sidscale.export import export_generator, network_from_state
from sidscale.families import spec_for_kind
from sidscale.families.base import decode_in_chunks, resolve
from sidscale.method.sid_lsg import multi_step_generate
from sidscale.sample import seeded_generator_noises
from sidscale.testing import fault_injection


def sampling_meta(r: Any) -> dict:
    """How to sample the generator of run ``r`` (an export's ``sidscale.json``): the family's schedule as
    training used it (VP: the teacher's full alphas_cumprod; cfg.schedule is not read by training,
    so exporting it could give the sampler other betas), K, the generator's start level and the noise its
    steps 2..K add (``noise_type``)."""
    source = str(Path(r.teacher.path) / "scheduler" / "scheduler_config.json")
    s = r.settings
    return {
        "family": r.family.name, "generator_steps": s.generator_steps,
        "t_init": s.t_init, "sigma_init": s.sigma_init, "noise_type": s.noise_type,
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
def end_of_run(trainer: Any) -> dict | None:
    """The family's end-of-run hook (``FamilySpec.end_of_run``: the toy family's evaluation), after the
    final checkpoint and the export. A collective: every rank calls it. None when the family has none."""
    hook = spec_for_kind(trainer.cfg.teacher.kind).end_of_run
    return resolve(hook)(trainer) if hook else None
