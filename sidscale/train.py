"""SiD-LSG distillation on DeepSpeed: the product's main job.

Launch recipes (the run directory holds config.yaml, tb/, samples/, checkpoints/, export/):

    # one node, N processes (GPUs; on CPU: DS_ACCELERATOR=cpu, gloo)
    deepspeed --num_gpus N sidscale/train.py --config sd15 --run-dir runs/sd15 \
        --set teacher.path=/models/sd15 --set data.shards='/data/laion/prompts-{000000..000999}.tar'
    # the same under torchrun
    torchrun --nproc_per_node N sidscale/train.py --config toy --run-dir runs/toy
    # several nodes from a hostfile
    deepspeed --hostfile hosts.txt sidscale/train.py --config sdxl --run-dir /shared/runs/sdxl ...
    # SLURM: one task per GPU started by srun (RANK/WORLD_SIZE come from SLURM_PROCID/SLURM_NTASKS,
    # MASTER_ADDR/MASTER_PORT, unless set, from the first host of the node list and the job id)
    srun --ntasks-per-node 8 python sidscale/train.py --config sdxl --run-dir /shared/runs/$SLURM_JOB_ID

Starting in a directory that has checkpoints resumes from RUN/checkpoints/latest.
``--set resume=false`` refuses to start over an existing run instead.

One iteration (see docs/method in ../shared/docs/sid_lsg_method.md): a fake-score step on
``train.global_batch`` samples, then a generator step on fresh ones, each accumulated over
micro-batches; then the generator EMA update.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # `deepspeed sidscale/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if __name__ == "__main__":  # before the slow imports: a stop signal during start-up is kept, not fatal
    from sidscale import startup_signals

    startup_signals.install()

import numpy as np
import torch

from sidscale import checkpoint as ckpt_lib
from sidscale.config import (
    Config,
    ConfigError,
    accumulation_steps,
    add_config_args,
    config_from_args,
    config_to_dict,
    dump_config,
    validate,
)
from sidscale.core.io import atomic_torch_save, atomic_write_json
from sidscale.core.noise import PHASE_FAKE, PHASE_GEN, draw_step_noise, generator_step_count, rank_sample_indices
from sidscale.core.precision import apply_precision
from sidscale.data.prompts import INDEXED_PREFIX, IndexedPromptSource, StreamPromptSource
from sidscale.distributed import comm
from sidscale.distributed.ds_config import build_ds_config, check_precision_supported, zero_stage
from sidscale.distributed.engines import apply_configured_lr, build_engine, check_identical_across_ranks
from sidscale.distributed.leftovers import release_backward_leftovers
from sidscale.distributed.preemption import EXIT_REQUEUE, StopSignal
from sidscale.distributed.runtime import (
    EXIT_FAILURE,
    DistInfo,
    StartupError,
    exit_now,
    fail_fast,
    init_distributed,
    shutdown_distributed,
)
from sidscale.distributed.sharded_ema import EMALayoutError, ShardedEMA, ema_swapped_into
from sidscale.distributed.teacher_partition import Placement, choose_placement, partition_teacher
from sidscale.ema import ema_beta
from sidscale.errors import CheckpointSaveError, RunDirError
from sidscale.export import export_generator, network_from_state
from sidscale.families import family_for_kind
from sidscale.families.base import Teacher, decode_in_chunks
from sidscale.families.shared.compile import compile_unets
from sidscale.families.shared.host import HostConditioner
from sidscale.families.toy.fit import resolve_teacher_dir
from sidscale.method.guards import register_grad_sanitizers
from sidscale.method.sid_lsg import MethodSettings, fake_step, generator_step, multi_step_generate
from sidscale.run_lock import RunLock
from sidscale.run_logger import RunLogger, peak_memory_bytes
from sidscale.sample import seeded_generator_noises
from sidscale.terminal import method_label, quiet_third_party, sampler_title, teacher_sampler_name, toy_eval_scalars
from sidscale.testing import fault_injection

log = logging.getLogger("sidscale.train")


def prepare_run_dir(run_dir: Path, resume: bool, lock: RunLock | None = None) -> bool:
    """Create/check the run directory and take its lock (rank 0). Returns True when there is a run
    to resume. Writes nothing else: ``config.yaml`` is written once the run has started, so a start
    that fails (missing teacher, bad checkpoint) leaves the directory as it found it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"--run-dir {run_dir}: not writable ({e.strerror})") from e
    if lock is not None:
        lock.acquire()
    try:
        ckpt_lib.check_latest_marker(run_dir)
        ckpt_lib.recover_restored(run_dir)  # restored files make a set-aside checkpoint usable again
        has_checkpoint = ckpt_lib.find_resume_checkpoint(run_dir) is not None
        ckpt_lib.refuse_start_over(run_dir, has_checkpoint)
    except ckpt_lib.CheckpointError as e:
        raise RunDirError(str(e)) from None
    if not resume and (has_checkpoint or (run_dir / "config.yaml").exists()):
        raise RunDirError(f"--run-dir {run_dir} already holds a run and resume=false: refusing to overwrite it; "
                          "choose a new --run-dir or drop --set resume=false to continue it")
    return has_checkpoint


def check_resumable(run_dir: Path, cfg: Config, world_size: int) -> None:
    """Stage, precision and global batch of the newest checkpoint against this run (rank 0, before any
    model is built): one clear message instead of an error deep inside DeepSpeed's loader. Another
    number of ranks is resumed elastically (``sidscale.elastic``); that the global batch divides into
    this world's ranks was checked by ``validate``."""
    ckpt = ckpt_lib.find_resume_checkpoint(run_dir)
    meta = ckpt_lib.read_meta(ckpt)
    stage = zero_stage(build_ds_config(cfg, world_size))
    saved = meta.get("config", {})
    problems = []
    written_by = int(meta["world_size"])
    saved_batch = saved.get("train", {}).get("global_batch")
    if written_by != world_size and saved_batch is not None and saved_batch != cfg.train.global_batch:
        problems.append(f"it was written by {written_by} ranks with train.global_batch={saved_batch}; resuming on "
                        f"{world_size} ranks keeps the global batch (set train.global_batch={saved_batch}; "
                        "micro_batch x accumulation adapts to the ranks)")
    if "zero_stage" in meta and int(meta["zero_stage"]) != stage:
        problems.append(f"it was written with ZeRO stage {meta['zero_stage']}, deepspeed.config "
                        f"{cfg.deepspeed.config} is stage {stage}")
    precision = saved.get("train", {}).get("precision")
    if precision is not None and precision != cfg.train.precision:
        problems.append(f"it was trained with train.precision={precision}, this job asks for {cfg.train.precision}")
    if problems:
        raise ConfigError(f"cannot resume from {ckpt}: " + "; ".join(problems) + ". Use the run's own settings "
                          f"({run_dir / 'config.yaml'}) or start a new --run-dir")


def choose_resume_checkpoint(run_dir: Path, rank: int, world_size: int) -> Path:
    """The newest checkpoint whose files every rank finds intact (a collective).

    Each rank re-checksums its share of the files (``checkpoint.verify_share``); the ranks agree on
    the result before anything is loaded, so a damaged file makes every rank skip to the previous
    complete checkpoint together (warning naming the file) instead of one rank failing in the load
    while the others wait in its collectives."""
    candidates = comm.decide_on_rank0(ckpt_lib.resume_candidates, run_dir)
    reports = []
    for ckpt in candidates:
        problems = [p for share in comm.all_gather_object(ckpt_lib.verify_share(ckpt, rank, world_size))
                    for p in share]
        if not problems:
            return ckpt
        reports.append(f"{ckpt.name}: " + "; ".join(problems))
        if rank == 0:
            log.warning("checkpoint %s is damaged, skipping it: %s", ckpt, "; ".join(problems))
            print(f"sidscale: warning: checkpoint {ckpt} is damaged ({'; '.join(problems)}); trying the previous "
                  f"complete checkpoint (its meta.json is kept as {ckpt_lib.DAMAGED_META})", file=sys.stderr,
                  flush=True)
            ckpt_lib.set_aside_damaged(ckpt, problems)
        comm.barrier()  # nobody looks at the next candidate before rank 0 has set this one aside
    raise ConfigError(f"--run-dir {run_dir}: no usable checkpoint to resume from: " + " | ".join(reports)
                      + ". Restore the files, or start a new --run-dir")


def checkpoint_complete(run_dir: Path, step: int) -> bool:
    """Whether step ``step`` has a complete checkpoint, as rank 0 sees it, on every rank.

    Decided once and broadcast (a collective): on NFS / Lustre with client caching a rank may
    still see an older state of the directory, and ranks that disagree would split around the
    collectives of save_checkpoint and hang."""
    return comm.decide_on_rank0(ckpt_lib.is_complete, ckpt_lib.step_dir(run_dir, step))


def prepare_elastic_resume(path: Path, world_size: int) -> tuple[int, Path | None]:
    """(ranks that wrote ``path``, its universal copy or None when it is this job's world size).
    A collective: rank 0 converts (``sidscale.elastic``) while the others wait (up to
    ``elastic.CONVERSION_TIMEOUT_S``); a failed conversion is one error on every rank, never a hang."""
    from sidscale import elastic

    written_by = comm.decide_on_rank0(elastic.writer_count, path, world_size)  # prunes stale universal copies
    if written_by == world_size:
        return written_by, None

    def convert() -> tuple[Path | None, str | None]:
        print(f"sidscale: elastic resume: {path} was written by {written_by} ranks, this job has {world_size}; "
              "converting its ZeRO states to DeepSpeed's universal format (the checkpoint stays as it is)",
              flush=True)
        try:
            return elastic.convert_to_universal(path), None
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            log.exception("universal conversion of %s failed", path)
            return None, (f"converting {path} (written by {written_by} ranks) for {world_size} ranks failed: "
                          f"{type(e).__name__}: {e}")

    # NOTE: the conversion of an 8B+ model's optimizer states can take longer than dist.timeout_s; the
    # other ranks wait on a gloo group of its own, so no NCCL collective is pending meanwhile.
    out, error = comm.broadcast_object_after_long_work(convert, elastic.CONVERSION_TIMEOUT_S,
                                                       what="converting the checkpoint for elastic resume")
    if error:
        raise ConfigError(error + ". Resume it with the number of ranks that wrote it")
    return written_by, out


class Trainer:
    teacher_engine = None  # the partitioned teacher's optimizer-less ZeRO-3 engine (teacher.partitioned)

    def __init__(self, cfg: Config, run_dir: Path, dist_info: DistInfo, teacher: Teacher | None = None,
                 load_universal: bool = False):
        """``teacher``: an already built teacher (benchmarks build real-size random-weight ones from
        ``sidscale.models.presets``); by default it is loaded from ``cfg.teacher``.
        ``load_universal``: the engines will load a universal checkpoint (elastic resume)."""
        self.cfg, self.run_dir, self.dist = cfg, Path(run_dir), dist_info
        # TF32 off for fp32 (the reference recipe), allowed for bf16/fp16: sidscale/core/precision.py says why.
        apply_precision(cfg.train.precision)
        self.world, self.rank, self.device = dist_info.world_size, dist_info.rank, dist_info.device
        self.micro = cfg.train.micro_batch
        self.gas = accumulation_steps(cfg, self.world)
        self.settings = MethodSettings.from_config(cfg.method)
        self.ds_config = build_ds_config(cfg, self.world)
        if load_universal:  # DeepSpeed reads this at load_checkpoint (engine and ZeRO optimizer)
            self.ds_config["checkpoint"] = {**self.ds_config.get("checkpoint", {}), "load_universal": True}
        self.zero_stage = zero_stage(self.ds_config)
        if cfg.train.compile and self.zero_stage == 3:
            raise ConfigError("train.compile = true with ZeRO-3: its parameter-gathering hooks break "
                              "the compiled graphs; use ds_configs/zero1.json or zero2.json, or compile=false")

        # The model family's adapter: loading, prompt encoding, the network call, the schedule,
        # latents and export (sidscale/families). Nothing below branches on the family.
        self.family = family_for_kind(cfg.teacher.kind)
        if teacher is None:
            # The toy teacher is fitted once (rank 0), then every rank loads the same files.
            fault_injection.maybe_fail("teacher_fit", 0, self.rank)
            comm.broadcast_object_after_long_work(lambda: resolve_teacher_dir(cfg.teacher),
                                                  what="preparing the teacher")
            fault_injection.maybe_fail("load_teacher", 0, self.rank)
            teacher = self.family.load_teacher(cfg, self.device)
        if cfg.teacher.text_encoders == "cpu":  # weights in host memory, outputs on the device
            teacher.conditioner = HostConditioner(teacher.conditioner, self.device)
        self.teacher: Teacher = teacher
        self.schedule = self.teacher.schedule
        check_identical_across_ranks({"teacher network": self.teacher.net,
                                      "text encoder(s)": self.teacher.conditioner})

        # Where the frozen teacher lives (teacher.partitioned): decided on rank 0 (auto: from the memory
        # plan) and broadcast, so every rank takes the same branch around the collectives below.
        self.teacher_placement = comm.decide_on_rank0(self._choose_teacher_placement)
        if self.dist.is_main:
            log.info("teacher placement: %s", self.teacher_placement.reason)
        if self.teacher_placement.partitioned and cfg.train.compile:
            raise ConfigError(f"train.compile = true with a partitioned teacher ({self.teacher_placement.reason}): "
                              "ZeRO-3's parameter hooks break the compiled graphs; set teacher.partitioned=false "
                              "or train.compile=false")

        # Under ZeRO-3 both nets are built straight into their partitions (no full fp32 copy per
        # rank: sidscale.distributed.zero_init), from the teacher while it is still whole.
        self.gen_engine = build_engine(self.teacher.net, cfg.generator, self.ds_config)
        self.fake_engine = build_engine(self.teacher.net, cfg.fake, self.ds_config)
        if cfg.teacher.grad_checkpointing:
            self.teacher.net.enable_gradient_checkpointing()
        # The partitioned teacher: ``teacher.net`` stays the network the method calls (the engine's
        # ``.module``, never the engine's forward: sidscale.distributed.teacher_partition).
        self.teacher_engine = None
        if self.teacher_placement.partitioned:
            self.teacher_engine = partition_teacher(self.teacher.net, self.ds_config, cfg.teacher.dtype)
        if cfg.train.precision != "fp16":
            # NOTE: with fp16 the loss scaler must see inf gradients to skip the step, so the
            # method's NaN->0 / inf->1e5 mapping applies to fp32 and bf16 only.
            register_grad_sanitizers(self.gen_engine.module)
            register_grad_sanitizers(self.fake_engine.module)
        if cfg.train.compile:
            compile_unets([self.gen_engine.module, self.fake_engine.module, self.teacher.net],
                          cfg.train.compile_backend)
            log.info("torch.compile (backend %s): generator, fake and teacher UNets; the first iterations "
                     "compile", cfg.train.compile_backend)
        # the EMA of the generator's fp32 master weights, partitioned like its ZeRO optimizer
        self.ema = ShardedEMA(self.gen_engine.module, self.gen_engine.optimizer)

        # prediction functions: the engine forward where the net trains, .module where it is only
        # evaluated (environment_notes.md: the engine's hooks must not run in the generator step).
        # ``role``: a family may call each net differently (FLUX: its distilled-guidance embedding).
        wrap = self.family.prediction_fn
        self.gen_train = wrap(self.gen_engine, self.schedule, role="generator")
        self.gen_eval = wrap(self.gen_engine.module, self.schedule, role="generator")
        self.fake_train = wrap(self.fake_engine, self.schedule, role="fake")
        self.fake_eval = wrap(self.fake_engine.module, self.schedule, role="fake")
        self.teacher_eval = wrap(self.teacher.net, self.schedule, role="teacher")

        self.prompts = self._build_prompt_source()
        self.step, self.images_seen = 0, 0
        self.logger: RunLogger | None = None

    def _choose_teacher_placement(self) -> Placement:
        """``teacher.partitioned`` resolved (auto: sidscale.perf.placement, from the real networks)."""
        setting = self.cfg.teacher.partitioned
        if setting != "auto":
            return choose_placement(setting)
        from sidscale.perf.placement import replicated_teacher_fits

        # NOTE: runs on rank 0 inside decide_on_rank0: an exception here would leave the other ranks in
        # the broadcast, so a plan that cannot be made means "replicated", said in the log
        try:
            fits, detail = replicated_teacher_fits(self.teacher, self.cfg, self.ds_config, self.world, self.device)
        except Exception as e:  # noqa: BLE001
            log.exception("teacher.partitioned = auto: the memory plan failed")
            fits, detail = None, f"the memory plan failed: {type(e).__name__}: {e}"
        return choose_placement(setting, fits, detail)

    # ----------------------------------------------------------------------------- data
    def _toy_prompts(self) -> list[str]:
        """The toy prompts of this teacher's mixture (or of the default mixture for SD teachers)."""
        from sidscale.families.toy.fit import load_toy_mixture
        from sidscale.families.toy.mixture import ToyMixture

        if (Path(self.teacher.path) / "toy_mixture.json").is_file():
            return load_toy_mixture(self.teacher.path).prompts
        return ToyMixture().prompts

    def _build_prompt_source(self):
        d = self.cfg.data
        if d.shards.startswith(INDEXED_PREFIX):
            name = d.shards[len(INDEXED_PREFIX):]
            if name != "toy":
                raise ConfigError(f"data.shards = {d.shards!r}: the only indexed source is 'indexed:toy'")
            return IndexedPromptSource(self._toy_prompts(), self.cfg.train.seed)
        shards = d.shards
        if shards == "toy":
            shards = str(self.run_dir / "data" / "toy_prompts" / "manifest.json")
            if self.dist.is_main and not Path(shards).is_file():
                from sidscale.data.shards import write_prompt_shards

                write_prompt_shards(self._toy_prompts(), Path(shards).parent, shard_size=4, overwrite=True)
            comm.barrier()
        if shards.startswith("/path/to/"):
            raise ConfigError(f"data.shards = {shards!r} is the preset's placeholder: give your prompt tars "
                              "(tools/make_prompt_shards.py) or a manifest.json")
        if not shards:
            raise ConfigError("data.shards is empty: give a brace pattern of prompt tars, a manifest.json "
                              "(tools/make_prompt_shards.py makes both), or 'toy'")
        return StreamPromptSource(shards, rank=self.rank, world_size=self.world, batch_size=self.micro,
                                  seed=self.cfg.train.seed, num_workers=d.num_workers,
                                  shuffle_buffer=d.shuffle_buffer, resampled=d.resampled,
                                  tokenize=self.teacher.conditioner.tokenize)

    def _inputs(self, phase: int, accum_round: int):
        idx = rank_sample_indices(self.world, self.rank, self.micro, accum_round)
        s = self.settings
        noise = draw_step_noise(self.cfg.train.seed, self.step, phase, idx, self.teacher.latent_shape,
                                lambda g: self.schedule.draw_loss_level(s, g), s.prompt_dropout, self.device,
                                generator_steps=s.generator_steps)
        prompts, input_ids = self.prompts.batch(self.step, phase, idx)
        cond = (self.teacher.conditioner.encode_ids(input_ids) if input_ids is not None
                else self.teacher.conditioner.encode(prompts))
        return noise, cond, self.teacher.conditioner.empty(self.micro)

    # ----------------------------------------------------------------------------- one iteration
    def train_step(self) -> dict[str, torch.Tensor]:
        """One fake-score step, then one generator step, then the EMA (method page, in order)."""
        stats: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        t0 = time.perf_counter()
        # K-step generators: both phases run the first k of the K steps (the same k on every rank)
        steps_k = generator_step_count(self.cfg.train.seed, self.step, self.settings.generator_steps)
        for r in range(self.gas):
            noise, cond, uncond = self._inputs(PHASE_FAKE, r)
            loss, st = fake_step(self.gen_eval, self.fake_train, self.schedule, noise, cond, uncond,
                                 self.settings, loss_normaliser=self.micro, k=steps_k)
            self.fake_engine.backward(loss)
            self.fake_engine.step()
            for k, v in st.items():
                stats[k] = stats[k] + v.float() / (self.gas if k.startswith("loss") else 1)
        fake_applied = self.fake_engine.was_step_applied()
        fault_injection.maybe_fail("mid_step", self.step + 1, self.rank)
        t1 = time.perf_counter()

        gen_applied = False
        if fake_applied:  # fp16 overflow in the fake engine: the generator skips this iteration too
            self.fake_engine.module.requires_grad_(False)  # frozen, but still in the autograd graph
            try:
                for r in range(self.gas):
                    noise, cond, uncond = self._inputs(PHASE_GEN, r)
                    loss, st = generator_step(self.gen_train, self.fake_eval, self.teacher_eval, self.schedule,
                                              noise, cond, uncond, self.settings, loss_normaliser=self.micro, k=steps_k)
                    self.gen_engine.backward(loss)
                    release_backward_leftovers(self.fake_engine, self.teacher_engine)
                    self.gen_engine.step()
                    for k, v in st.items():
                        stats[k] = stats[k] + v.float() / (1 if k.startswith("dropped") else self.gas)
            finally:
                self.fake_engine.module.requires_grad_(True)
            gen_applied = self.gen_engine.was_step_applied()
        t2 = time.perf_counter()
        if gen_applied:
            tc = self.cfg.train
            self.ema.update(ema_beta(tc.global_batch, self.images_seen, tc.ema_halflife_kimg, tc.ema_rampup_ratio))
        stats["skipped_fake"] = torch.tensor(float(not fake_applied))
        stats["skipped_gen"] = torch.tensor(float(not gen_applied))
        stats["time_fake"] = torch.tensor(t1 - t0)
        stats["time_gen"] = torch.tensor(time.perf_counter() - t1 if gen_applied else t2 - t1)
        self.step += 1
        self.images_seen += self.cfg.train.global_batch
        return stats

    # ----------------------------------------------------------------------------- checkpoints
    def _rng_state(self) -> dict:
        state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            # NOTE: this rank's own GPU only: get_rng_state_all() would open a CUDA context (hundreds
            # of MB) on every GPU of the node from every rank.
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def save_checkpoint(self) -> Path:
        """Save on every rank; on an I/O error (disk full, quota) stop with a clear message. The
        failed directory is never marked ``latest``, so the previous checkpoint stays the resume point."""
        path = ckpt_lib.step_dir(self.run_dir, self.step)
        try:
            return self._save_checkpoint(path)
        except (OSError, RuntimeError) as e:
            # NOTE: torch.save (DeepSpeed's engine shards) reports a failed write (ENOSPC, EDQUOT, EIO)
            # as a RuntimeError from its zip writer ("unexpected pos ..."), not as an OSError.
            reason = getattr(e, "strerror", None) or str(e).strip()
            with contextlib.suppress(OSError):
                reason += f" ({shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free on the checkpoint disk)"
            previous = ckpt_lib.find_resume_checkpoint(self.run_dir)
            raise CheckpointSaveError(
                f"saving checkpoint {path} failed on rank {self.rank}: {reason}; the previous complete "
                f"checkpoint ({previous or 'none'}) is intact and remains the resume point") from e

    def _save_checkpoint(self, path: Path) -> Path:
        client = {"step": self.step, "images_seen": self.images_seen}
        # A re-save into an existing step directory (a resumed run saving the step it resumed
        # from, a stop right after a periodic save) overwrites files that an old meta.json vouches
        # for: remove it first, on rank 0 before any rank writes, so a re-save that dies half-way
        # leaves an incomplete directory, never a complete-looking mix of old and new shards.
        if self.dist.is_main:
            ckpt_lib.prepare_save_dir(path)  # invalidated, or moved aside when damaged
        comm.barrier()
        # Every rank saves its engine shards, then its own client state, atomically.
        self.gen_engine.save_checkpoint(str(path), tag="generator", client_state=client, save_latest=False)
        self.fake_engine.save_checkpoint(str(path), tag="fake", client_state=client, save_latest=False)
        atomic_torch_save(ckpt_lib.rank_file(path, self.rank), {
            "ema": self.ema.state_dict(), "rng": self._rng_state(), "data": self.prompts.state_dict(),
            "step": self.step, "images_seen": self.images_seen,
        })
        fault_injection.maybe_fail("in_save", self.step, self.rank)
        comm.barrier()
        # Every rank checksums the files it wrote, while they are still in the page cache: meta.json
        # records them, and a resume verifies them before loading (module docstring of checkpoint.py).
        files: dict[str, dict] = {}
        for share in comm.all_gather_object(ckpt_lib.own_checksums(path, self.rank, self.world)):
            files.update(share)

        def finish() -> None:  # rank 0; pruning old checkpoints can take minutes on a parallel filesystem
            ckpt_lib.write_meta(path, {
                "step": self.step, "images_seen": self.images_seen, "world_size": self.world,
                "zero_stage": self.zero_stage, "config": config_to_dict(self.cfg),
                "ema_names": self.ema.names, "ema_shapes": [list(s) for s in self._ema_shapes()],
                "sampling": self.sampling_meta(), "files": files,
            })
            ckpt_lib.mark_latest(self.run_dir, path)
            fault_injection.maybe_fail("prune", self.step, self.rank)
            ckpt_lib.prune_checkpoints(self.run_dir, self.cfg.train.keep_last)

        comm.broadcast_object_after_long_work(finish, what=f"completing checkpoint {path.name} and pruning old ones")
        return path

    def _ema_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(getattr(p, "ds_shape", p.shape)) for p in self.ema.params]

    def resume(self, path: Path, universal: Path | None = None) -> None:
        """Load checkpoint ``path``; ``universal``: its universal copy when it was written by another
        number of ranks (``prepare_elastic_resume``; the engines were built with ``load_universal``)."""
        meta = ckpt_lib.read_meta(path)
        written_by = int(meta["world_size"])
        if (written_by != self.world) != (universal is not None):
            raise RuntimeError(f"checkpoint {path} was written by {written_by} ranks, this run has {self.world}: "
                               "load it through prepare_elastic_resume")
        for engine, tag in ((self.gen_engine, "generator"), (self.fake_engine, "fake")):
            load_path, _ = engine.load_checkpoint(str(universal or path), tag=tag)
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load {(universal or path) / tag}")
            apply_configured_lr(engine, getattr(self.cfg, tag).lr, f"{tag}.lr", self.dist.is_main)
        if universal is None:
            state = torch.load(ckpt_lib.rank_file(path, self.rank), map_location="cpu", weights_only=False)
            try:
                self.ema.load_state_dict(state["ema"])
            except EMALayoutError:  # a checkpoint of an older sidscale: reassemble its EMA, take this rank's part
                self.ema.load_full(ckpt_lib.full_ema_from_checkpoint(path))
            self.prompts.load_state_dict(state["data"])
        else:
            state = self._load_resharded(path, meta, written_by)
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.step, self.images_seen = int(state["step"]), int(state["images_seen"])

    def _load_resharded(self, path: Path, meta: dict, written_by: int) -> dict:
        """EMA and data cursor of a checkpoint of ``written_by`` ranks, for this rank (``sidscale.elastic``).
        Returns old rank (this rank mod ``written_by``)'s state, whose RNG states this rank takes."""
        from sidscale import elastic
        from sidscale.data.stream import DataWarning

        # memory-mapped: each rank copies only the overlap of the old shards with its own partition
        states = [torch.load(ckpt_lib.rank_file(path, r), map_location="cpu", weights_only=False, mmap=True)
                  for r in range(written_by)]
        self.ema.load_resharded([s["ema"] for s in states], meta["ema_names"], f"checkpoint {path}")
        with warnings.catch_warnings():
            if not self.dist.is_main:  # one DataWarning for the job, not one per rank
                warnings.simplefilter("ignore", DataWarning)
            self.prompts.load_state_dict(elastic.merged_stream_state([s["data"] for s in states], self.rank))
        return states[self.rank % written_by]

    # ----------------------------------------------------------------------------- outputs
    def sampling_meta(self) -> dict:
        """How to sample the generator (an export's ``sidscale.json``): the family's schedule as
        training used it (VP: the teacher's full alphas_cumprod; cfg.schedule is not read by training,
        so exporting it could give the sampler other betas), K and the generator's start level."""
        source = str(Path(self.teacher.path) / "scheduler" / "scheduler_config.json")
        s = self.settings
        return {
            "family": self.family.name, "generator_steps": s.generator_steps,
            "t_init": s.t_init, "sigma_init": s.sigma_init,
            "prediction_type": getattr(self.schedule, "prediction_type", "velocity"),
            "schedule": self.schedule.meta(source),
            "latent_shape": list(self.teacher.latent_shape), "scaling_factor": self.teacher.scaling_factor,
            "shift_factor": self.teacher.shift_factor,
            "teacher_path": str(self.teacher.path.resolve()), "teacher_kind": self.cfg.teacher.kind,
            "resolution": self.cfg.teacher.resolution, "step": self.step, "images_seen": self.images_seen,
            **self.family.sampling_extras(self.cfg),
        }

    @contextlib.contextmanager
    def ema_network(self):
        """The EMA generator as a plain network (the teacher's class) on rank 0 in the teacher's dtype
        (fp32 for the toy teacher, so its evaluation is the fp32 EMA's), for the duration of the block;
        None on the other ranks (a collective: all ranks enter it). The export stays fp32 (``export``).

        NOTE: the full fp32 EMA is gathered into rank 0's host memory and the network exists on
        the device only inside the block, then is freed: a resident fp32 copy would cost 4 bytes
        per parameter on rank 0 for the whole run (~10 GB at SDXL size) for a preview every few
        hundred steps. The memory plan counts it as the ``preview`` phase.
        """
        full = self.ema.gather_to_main()
        if not self.dist.is_main:
            yield None
            return
        net = network_from_state(self.family.network_class(), self.teacher.net.config, full)
        del full
        net = net.to(self.device, self.teacher.net.dtype).eval().requires_grad_(False)
        try:
            yield net
        finally:
            del net

    ema_unet = ema_network  # the name before model families

    def generate_with(self, net: torch.nn.Module, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """Latents of the K-step generator ``net`` (image i from seed i), as sampling an export does."""
        noises = seeded_generator_noises(seeds, self.teacher.latent_shape, self.settings.generator_steps)
        cond = self.teacher.conditioner.encode(prompts)
        return multi_step_generate(self.family.prediction_fn(net, self.schedule), self.schedule,
                                   [n.to(self.device) for n in noises], cond, self.settings)

    def ema_in_generator(self):
        """ZeRO-3: the EMA swapped into the partitioned generator for a block, on every rank
        (``sharded_ema.ema_swapped_into``; the previews use it instead of a whole copy on rank 0)."""
        return ema_swapped_into(self.gen_engine, self.ema)

    @torch.no_grad()
    def preview(self) -> None:
        """Rank 0 writes the preview grid. ZeRO-3: every rank generates with the EMA swapped into the
        partitioned generator (``ema_in_generator``); else rank 0 generates with a copy (``ema_network``).
        A partitioned teacher draws its reference samples on every rank first (its calls are collectives)."""
        if self.teacher_engine is not None:
            self._partitioned_teacher_reference()
        prompts, seeds = self._preview_prompts()
        if self.zero_stage == 3:
            with self.ema_in_generator() as net:
                x0 = self.generate_with(net, prompts, seeds)
            if self.dist.is_main:
                self._preview_with(x0, prompts, seeds)
            return
        with self.ema_network() as net:
            if net is not None:
                self._preview_with(self.generate_with(net, prompts, seeds), prompts, seeds)

    _preview_reference: torch.Tensor | None = None  # the teacher's preview samples (made once)

    def _preview_prompts(self) -> tuple[list[str], list[int]]:
        p = self.cfg.preview
        prompts = [q for q in p.prompts for _ in range(p.seeds_per_prompt)]
        return prompts, list(range(len(prompts)))

    _teacher_reference_made = False

    def _partitioned_teacher_reference(self) -> None:
        """The preview's teacher samples with a partitioned teacher, made once on EVERY rank: each of its
        calls gathers the teacher's layers from all ranks (a collective), so rank 0 cannot run it alone.
        Rank 0 keeps the images; no rank ever holds the whole teacher."""
        steps = self.cfg.eval.teacher_steps
        if self._teacher_reference_made or steps <= 0:
            return
        prompts, seeds = self._preview_prompts()
        reference = self._teacher_samples(prompts, seeds, steps, self.settings.cfg_eval_real)
        self._preview_reference = reference if self.dist.is_main else None
        self._teacher_reference_made = True

    def _preview_with(self, x0: torch.Tensor, prompts: list[str], seeds: list[int]) -> None:
        p = self.cfg.preview
        t = self.teacher
        images = decode_in_chunks(self.family, t.vae, x0, t.scaling_factor, t.shift_factor)
        steps, cfg = self.cfg.eval.teacher_steps, self.settings.cfg_eval_real
        if self._preview_reference is None and steps > 0:
            # a fixed reference for the eye: the teacher's multi-step sample of the same prompt and seed
            # (its x_T is the student's first noise), computed at the first preview only
            self._preview_reference = self._teacher_samples(prompts, seeds, steps, cfg)
        headers = (f"student (EMA, {self.settings.generator_steps} step(s)) at step {self.step}",
                   f"teacher, {steps} steps, cfg {cfg:g} (same prompt and seed)")
        self.logger.preview(self.step, images, p.prompts, p.seeds_per_prompt, self._preview_reference, headers)

    @torch.no_grad()
    def _teacher_samples(self, prompts: list[str], seeds: list[int], steps: int, cfg: float) -> torch.Tensor:
        """Decoded images of the teacher's own sampler (its family's), on the CPU. In chunks of half the
        preview (at least a micro-batch): with CFG's doubled batch, no larger than the student's preview."""
        out, c = [], self.teacher.conditioner
        chunk = max(self.micro, len(prompts) // 2)
        for s in range(0, len(prompts), chunk):
            p, sd = prompts[s:s + chunk], seeds[s:s + chunk]
            x0 = self.family.teacher_sampler(self.teacher, c.encode(p), c.empty(len(p)), cfg, steps,
                                             x_T=seeded_generator_noises(sd, self.teacher.latent_shape, 1)[0])
            out.append(decode_in_chunks(self.family, self.teacher.vae, x0, self.teacher.scaling_factor,
                                        self.teacher.shift_factor))
        return torch.cat(out)

    def export(self) -> Path | None:
        full = self.ema.gather_to_main()

        def write() -> Path:  # rank 0; a FLUX export writes tens of GB
            fault_injection.maybe_fail("export", self.step, self.rank)
            return export_generator(full, dict(self.teacher.net.config), self.run_dir / "export",
                                    self.sampling_meta(), link_frozen=self.cfg.train.export_link_frozen)

        out = comm.broadcast_object_after_long_work(write, what="the export")
        return out if self.dist.is_main else None

    def toy_evaluation(self) -> dict | None:
        """One-step student vs the teacher's DDIM sampler, both against exact mixture samples."""
        teacher_numbers = None
        if self.teacher_engine is not None and self.cfg.eval.teacher_steps > 0:
            # A partitioned teacher samples on every rank together (its calls are collectives), unless
            # rank 0 has its numbers cached; rank 0 then only evaluates the student.
            if comm.decide_on_rank0(lambda: self._cached_toy_teacher_numbers()[1] is None):
                from sidscale.families.toy.evaluation import toy_quality
                from sidscale.families.toy.fit import load_toy_mixture

                ev = self.cfg.eval
                teacher_numbers = toy_quality(self.teacher, load_toy_mixture(self.teacher.path), None,
                                              ev.num_samples, ev.teacher_steps, self.settings.cfg_eval_real,
                                              self.settings.t_init, settings=self.settings)
        with self.ema_network() as net:
            def evaluate() -> dict:  # rank 0 (minutes on a busy CPU machine)
                fault_injection.maybe_fail("toy_eval", self.step, self.rank)
                return self._toy_evaluation_with(net, teacher_numbers)

            result = comm.broadcast_object_after_long_work(evaluate, what="the toy evaluation")
        return result if self.dist.is_main else None

    _TOY_TEACHER_KEYS = ("frechet_teacher_ddim", "prompt_accuracy_teacher_ddim", "colour_accuracy_teacher_ddim")

    def _cached_toy_teacher_numbers(self) -> tuple[Path, dict | None]:
        """The teacher's toy-evaluation cache file and its numbers (None: not cached, or an older format)."""
        ev = self.cfg.eval
        # The teacher's DDIM number depends only on the teacher and the evaluation settings (its
        # reference samples are seeded), and costs 2 x teacher_steps forwards per sample: compute it
        # once per teacher and setting, cache it beside the toy teacher.
        cache = Path(self.cfg.teacher.cache_dir).expanduser() / "toy-eval-cache" / (hashlib.sha256(json.dumps(
            [str(Path(self.teacher.path).resolve()), ev.num_samples, ev.teacher_steps, self.settings.cfg_eval_real],
        ).encode()).hexdigest()[:16] + ".json")
        try:  # rank 0 only, inside decide_on_rank0: a torn cache file is a cache miss, not an exception
            cached = json.loads(cache.read_text()) if cache.is_file() else None
        except (OSError, ValueError):
            cached = None
        if cached is not None and not all(k in cached for k in self._TOY_TEACHER_KEYS):
            cached = None  # written by an older version: recompute
        return cache, cached

    def _toy_evaluation_with(self, unet: torch.nn.Module, teacher_numbers: dict | None = None) -> dict:
        """``teacher_numbers``: the teacher's part, already computed (by every rank, partitioned teacher)."""
        from sidscale.families.toy.evaluation import toy_quality
        from sidscale.families.toy.fit import load_toy_mixture

        ev = self.cfg.eval
        # NOTE: the other ranks only wait here, so rank 0 may use every core of the node (CPU runs
        # are usually launched with OMP_NUM_THREADS=1 per rank).
        threads = torch.get_num_threads()
        torch.set_num_threads(max(threads, len(os.sched_getaffinity(0))))
        cache, cached = self._cached_toy_teacher_numbers()
        teacher_keys = self._TOY_TEACHER_KEYS
        if cached is None and teacher_numbers is not None:
            cached = {k: teacher_numbers[k] for k in teacher_keys}
            with contextlib.suppress(OSError):  # a read-only cache dir only costs the recomputation
                atomic_write_json(cache, cached)
        try:
            # NOTE: the teacher runs here on rank 0 alone only when it is replicated (a partitioned
            # teacher's numbers come in ``teacher_numbers`` or from the cache).
            steps = 0 if cached or self.teacher_engine is not None else ev.teacher_steps
            result = toy_quality(self.teacher, load_toy_mixture(self.teacher.path), unet, ev.num_samples,
                                 steps, self.settings.cfg_eval_real, self.settings.t_init,
                                 settings=self.settings)
        finally:
            torch.set_num_threads(threads)
        if cached:
            result.update({k: cached[k] for k in teacher_keys})
        elif "frechet_teacher_ddim" in result:
            with contextlib.suppress(OSError):  # a read-only cache dir only costs the recomputation
                atomic_write_json(cache, {k: result[k] for k in teacher_keys})
        sampler = teacher_sampler_name(self.schedule)
        result.update(step=self.step, num_samples=ev.num_samples, teacher_steps=ev.teacher_steps,
                      teacher_cfg=self.settings.cfg_eval_real, generator_steps=self.settings.generator_steps,
                      teacher_sampler=sampler)
        atomic_write_json(self.run_dir / "toy_eval.json", result)
        self.logger.scalars(self.step, toy_eval_scalars(result, result["generator_steps"], sampler, ev.teacher_steps))
        teacher_part = (f" | teacher {sampler_title(sampler)} {ev.teacher_steps} steps "
                        f"cfg {self.settings.cfg_eval_real} "
                        f"{result['frechet_teacher_ddim']:.4f} (prompt / colour accuracy "
                        f"{result['prompt_accuracy_teacher_ddim']:.0%} / {result['colour_accuracy_teacher_ddim']:.0%})"
                        if "frechet_teacher_ddim" in result else "")
        self.logger.write(
            f"toy Frechet distance to exact samples ({ev.num_samples} samples): "
            f"{self.settings.generator_steps}-step student (EMA) "
            f"{result['frechet_one_step']:.4f} (prompt / colour accuracy {result['prompt_accuracy_one_step']:.0%} / "
            f"{result['colour_accuracy_one_step']:.0%})"
            f"{teacher_part} | exact-vs-exact floor {result['frechet_exact_vs_exact']:.4f}")
        return result

    # ----------------------------------------------------------------------------- loop
    def _log(self, stats: dict[str, torch.Tensor], seconds: float, steps: int) -> None:
        keys = sorted(stats)
        vec = comm.all_reduce(torch.stack([stats[k].float().to(self.device) for k in keys]))
        vals = dict(zip(keys, (vec / self.world).tolist(), strict=True))
        src_stats = self.prompts.stats()
        if self.logger is None or not self.dist.is_main:
            return
        out = {
            "loss/fake": vals["loss_fake"], "loss/gen": vals.get("loss_gen", float("nan")),
            "gen/w_mean": vals.get("w_mean", float("nan")),
            "nan/dropped_fake": vals["dropped_fake"] * self.world,
            "nan/dropped_gen": vals.get("dropped_gen", 0.0) * self.world,
            "fp16/skipped_fake": vals["skipped_fake"], "fp16/skipped_gen": vals["skipped_gen"],
            "time/fake_step_s": vals["time_fake"], "time/gen_step_s": vals["time_gen"],
            "lr/generator": self.cfg.generator.lr, "lr/fake": self.cfg.fake.lr,
            "perf/images_per_s": self.cfg.train.global_batch * steps / max(seconds, 1e-9),
            "progress/kimg": self.images_seen / 1000.0,
        }
        grad_norm = self.gen_engine.get_global_grad_norm()
        if grad_norm is not None:
            out["gen/grad_norm"] = float(grad_norm)
        out.update({f"memory/{k}": v for k, v in peak_memory_bytes(self.device).items()})
        out.update({f"data/{k}": float(v) for k, v in src_stats.items()})
        self.logger.scalars(self.step, out)

    def run(self, stop: StopSignal | None = None) -> bool:
        """Train to ``train.max_steps``. Returns False when stopped early by a signal (after saving)."""
        tc = self.cfg.train
        self.logger = RunLogger(self.run_dir, tc.max_steps, self.step, tc.global_batch, self.dist.is_main,
                                method_label(self.schedule, self.settings.generator_steps))
        # NOTE: per-step stats stay on their device and are summed there; the one host sync is
        # the all-reduce + .tolist() at logging steps.
        window: dict[str, torch.Tensor] = {}
        window_steps, window_start = 0, time.perf_counter()
        try:
            while self.step < tc.max_steps:
                stats = self.train_step()
                for k, v in stats.items():
                    window[k] = v.detach().float() + window[k] if k in window else v.detach().float()
                window_steps += 1
                self.logger.step(self.step, self.images_seen)
                fault_injection.maybe_fail("after_step", self.step, self.rank)
                if self.step % tc.log_every == 0 or self.step == tc.max_steps:
                    self._log({k: v / window_steps for k, v in window.items()},
                              time.perf_counter() - window_start, window_steps)
                    window.clear()
                    window_steps, window_start = 0, time.perf_counter()
                # NOTE: save first: a preview that fails (out of memory) must not lose the steps since the last save
                if self.step % tc.ckpt_every == 0 or (self.step == tc.max_steps and self.step % tc.preview_every == 0):
                    self.save_checkpoint()
                if self.step % tc.preview_every == 0:
                    self.preview()
                if stop is not None and self.step < tc.max_steps and stop.stop_requested():
                    if not checkpoint_complete(self.run_dir, self.step):
                        self.save_checkpoint()
                    self.logger.write(f"sidscale: stopped by signal at step {self.step}; checkpoint saved")
                    return False
            self.logger.end_progress()
            if not checkpoint_complete(self.run_dir, self.step):
                self.save_checkpoint()
            elif self.dist.is_main:
                # a kill between the final meta.json and ``latest`` left the marker one checkpoint behind
                final = ckpt_lib.step_dir(self.run_dir, self.step)
                if ckpt_lib.latest_marked(self.run_dir) != final:
                    ckpt_lib.mark_latest(self.run_dir, final)
            if tc.export_at_end:
                out = self.export()
                if out is not None:
                    self.logger.write(f"exported EMA generator to {out}")
            if self.cfg.teacher.is_toy and self.cfg.eval.num_samples > 0:
                self.toy_evaluation()
            return True
        finally:
            self.logger.close()
            self.prompts.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--run-dir", required=True, help="run directory (created; resumed when it has checkpoints)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_third_party()
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"sidscale: config error: {e}", file=sys.stderr)
        return 2
    stop = StopSignal()  # installed before the slow start-up so an early signal is not lost
    run_lock = RunLock(Path(args.run_dir).expanduser())  # rank 0 takes it in prepare_run_dir
    try:
        dist_info = init_distributed(args.local_rank, timeout_s=cfg.dist.timeout_s)
    except StartupError as e:  # an old DeepSpeed, no usable GPU
        print(f"sidscale: error: {e}", file=sys.stderr)
        return 2
    rank = dist_info.rank
    try:
        validate(cfg, dist_info.world_size)
        build_ds_config(cfg, dist_info.world_size)  # a bad ds_config fails here, before any model loads
        check_precision_supported(cfg.train.precision)
        run_dir = Path(args.run_dir).expanduser()
        decision: tuple[bool, str | None] = (False, None)
        if dist_info.is_main:
            try:
                decision = (prepare_run_dir(run_dir, cfg.resume, run_lock), None)
                if decision[0]:
                    check_resumable(run_dir, cfg, dist_info.world_size)
            except ConfigError as e:
                decision = (False, str(e))
        has_checkpoint, error = comm.broadcast_object(decision)
        if error:
            raise ConfigError(error)
        universal, written_by = None, dist_info.world_size
        if has_checkpoint:  # verified by every rank before any model is built
            path = choose_resume_checkpoint(run_dir, rank, dist_info.world_size)
            written_by, universal = prepare_elastic_resume(path, dist_info.world_size)
        trainer = Trainer(cfg, run_dir, dist_info, load_universal=universal is not None)
        if has_checkpoint:
            trainer.resume(path, universal)
            if dist_info.is_main:
                via = f", written by {written_by} ranks, resharded for {dist_info.world_size}" if universal else ""
                print(f"sidscale: resumed from {path} (step {trainer.step}{via})", flush=True)
        if not comm.all_ranks_agree(True):
            raise RuntimeError("a rank failed during start-up")
        if universal is not None:  # every rank has loaded it; deleting a big model's copy takes a while
            from sidscale.elastic import remove_universal

            comm.broadcast_object_after_long_work(lambda: remove_universal(path, written_by),
                                                  what="removing the universal copy of the checkpoint")
        if dist_info.is_main:  # the run has started: only now does the directory hold its config
            dump_config(cfg, run_dir / "config.yaml")
        code = 0 if trainer.run(stop) else EXIT_REQUEUE
        if code == EXIT_REQUEUE:  # per rank: a multi-node job's logs show every node stopped at the same step
            print(f"sidscale: rank {rank} stops at step {trainer.step} (exit {code}, requeue)", flush=True)
    except ConfigError as e:
        # Printed by every rank that has one: most are the same everywhere (same config, decisions
        # broadcast from rank 0), but a teacher file missing on one node's view of a shared filesystem
        # is seen by that node's ranks only, and would otherwise end the job without a word.
        print(f"{'' if dist_info.is_main else f'[rank {rank}] '}sidscale: error: {e}", file=sys.stderr, flush=True)
        exit_now(2)
    except CheckpointSaveError as e:
        print(f"sidscale: error: {e}", file=sys.stderr, flush=True)
        exit_now(EXIT_FAILURE)  # other ranks may be blocked in a collective of the failed save
    except BaseException as e:  # anything else, on any rank, KeyboardInterrupt included
        # NOTE: never the barrier of shutdown_distributed here: the other ranks are blocked in a
        # collective this rank will not join, so it would hang the whole job (until the NCCL
        # watchdog, 10+ minutes of every GPU). Print, then leave at once; the peers' collectives
        # fail when this process's connections close, or at dist.timeout_s, and launchers
        # (torchrun, srun --wait in slurm/distill.sh) end the rest. Exit 1, never 75: SLURM must
        # not requeue a crash.
        fail_fast(e, rank, 130 if isinstance(e, KeyboardInterrupt) else EXIT_FAILURE)
    # Clean end or requeue stop: every rank gets here after the same step.
    shutdown_distributed()
    run_lock.release()
    return code


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
