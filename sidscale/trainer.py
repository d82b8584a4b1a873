"""The Trainer: builds the run (engines, teacher, data, method), runs one generic training step over the
method's phases, and the loop with its cadences (log, checkpoint, preview, stop signal).

Nothing here branches on the model family (``sidscale/families``) or on the method (``sidscale/method``):
the method declares its phases (``method/base.py``), the checkpoint holds a registry of stateful pieces
(``checkpointing/``), and previews, the export and the end-of-run hook are ``outputs.py``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch

from sidscale.checkpointing.manager import Checkpointer, checkpoint_complete, repair_latest
from sidscale.checkpointing.states import CounterState, DataState, EMAState, EngineState, RealDataState, RNGState
from sidscale.config import Config, ConfigError, accumulation_steps, config_to_dict
from sidscale.core.noise import rank_sample_indices, sample_seed
from sidscale.core.precision import apply_precision
from sidscale.data.sources import build_prompt_source, build_real_source
from sidscale.distributed import comm
from sidscale.distributed.ds_config import build_ds_config, zero_stage
from sidscale.distributed.engines import build_engine, check_identical_across_ranks
from sidscale.distributed.leftovers import release_backward_leftovers
from sidscale.distributed.preemption import StopSignal
from sidscale.distributed.runtime import DistInfo
from sidscale.distributed.sharded_ema import ShardedEMA
from sidscale.distributed.teacher_partition import Placement, choose_placement, partition_teacher
from sidscale.families import family_for_kind
from sidscale.families.base import Teacher
from sidscale.families.shared.compile import compile_unets
from sidscale.families.shared.host import HostConditioner
from sidscale.families.toy.fit import resolve_teacher_dir
from sidscale.method.base import MEAN, Batch, Phase, PredictionFns, build_method
from sidscale.method.guards import register_grad_sanitizers
from sidscale.method.sid_lsg import MethodSettings
from sidscale.metrics import RunLogger, StatsWindow, peak_memory_bytes, reduce_over_ranks, step_scalars
from sidscale.outputs import Outputs, end_of_run
from sidscale.terminal import method_label
from sidscale.testing import fault_injection

log = logging.getLogger("sidscale.train")
# the noise key of the VAE posterior samples of image shards (apart from every phase's own draws)
VAE_SAMPLE_PHASE = 1000


class Trainer:
    teacher_engine = None  # the partitioned teacher's optimizer-less ZeRO-3 engine (teacher.partitioned)

    def __init__(self, cfg: Config, run_dir: Path, dist_info: DistInfo, teacher: Teacher | None = None,
                 load_universal: bool = False):
        """``teacher``: an already built teacher (benchmarks build real-size random-weight ones from
        ``sidscale.families.presets``); by default it is loaded from ``cfg.teacher``.
        ``load_universal``: the engines will load a universal checkpoint (elastic resume)."""
        self.cfg, self.run_dir, self.dist = cfg, Path(run_dir), dist_info
        # TF32 off for fp32 and pure_bf16 (the reference recipes), allowed for bf16/fp16: core/precision.py says why.
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
        self.teacher: Teacher = self._load_teacher(teacher)
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
        self._build_engines()
        self.method = build_method(cfg.method.name, self.settings, cfg.train, self.ema)
        self.prompts = build_prompt_source(cfg, self.run_dir, self.teacher, self.rank, self.world, self.dist.is_main)
        # real (latent, caption) pairs for a phase that reads them (method.adversarial); None otherwise
        self.real_data = build_real_source(cfg, self.run_dir, self.teacher, self.rank, self.world, self.dist.is_main)
        self.step, self.images_seen = 0, 0
        self.logger: RunLogger | None = None
        self.outputs = Outputs(self)
        # What a checkpoint holds: a new stateful piece is one entry here (checkpointing/states.py).
        self.checkpointer = Checkpointer(
            self.run_dir, self.rank, self.world, self.dist.is_main,
            engines={"generator": EngineState(self.gen_engine, cfg.generator.lr, "generator.lr"),
                     "fake": EngineState(self.fake_engine, cfg.fake.lr, "fake.lr")},
            states={"ema": EMAState(self.ema), "rng": RNGState(self.device), "data": DataState(self.prompts),
                    **({} if self.real_data is None else {"real_data": RealDataState(self.real_data)}),
                    "trainer": CounterState(self, extra_meta=lambda: {"sampling": self.sampling_meta()})},
            run_meta=lambda: {"world_size": self.world, "zero_stage": self.zero_stage,
                              "config": config_to_dict(self.cfg)},
            keep_last=cfg.train.keep_last, step=lambda: self.step)

    # ----------------------------------------------------------------------------- build
    def _load_teacher(self, teacher: Teacher | None) -> Teacher:
        cfg = self.cfg
        if teacher is None:
            # The toy teacher is fitted once (rank 0), then every rank loads the same files.
            fault_injection.maybe_fail("teacher_fit", 0, self.rank)
            comm.broadcast_object_after_long_work(lambda: resolve_teacher_dir(cfg.teacher),
                                                  what="preparing the teacher")
            fault_injection.maybe_fail("load_teacher", 0, self.rank)
            teacher = self.family.load_teacher(cfg, self.device)
        if cfg.teacher.text_encoders == "cpu":  # weights in host memory, outputs on the device
            teacher.conditioner = HostConditioner(teacher.conditioner, self.device)
        return teacher

    def _build_engines(self) -> None:
        cfg = self.cfg
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
            # method's NaN->0 / inf->1e5 mapping applies to fp32, bf16 and pure_bf16 only.
            register_grad_sanitizers(self.gen_engine.module)
            register_grad_sanitizers(self.fake_engine.module)
        if cfg.train.compile:
            compile_unets([self.gen_engine.module, self.fake_engine.module, self.teacher.net],
                          cfg.train.compile_backend)
            log.info("torch.compile (backend %s): generator, fake and teacher UNets; the first iterations "
                     "compile", cfg.train.compile_backend)
        # the EMA of the generator's fp32 master weights, partitioned like its ZeRO optimizer
        self.ema = ShardedEMA(self.gen_engine.module, self.gen_engine.optimizer)
        # The networks by role: the engines that step, and the networks a phase may freeze.
        self.engines = {"generator": self.gen_engine, "fake": self.fake_engine, "teacher": self.teacher_engine}
        self.networks = {"generator": self.gen_engine.module, "fake": self.fake_engine.module,
                         "teacher": self.teacher.net}
        # Prediction functions: the engine forward where the net trains, .module where it is only
        # evaluated (the engine's hooks must not run in the generator step). ``role``: a family may
        # call each net differently (FLUX: its distilled-guidance embedding).
        wrap = self.family.prediction_fn
        self.fns = PredictionFns(
            gen_engine_fn=wrap(self.gen_engine, self.schedule, role="generator"),
            gen_module_fn=wrap(self.gen_engine.module, self.schedule, role="generator"),
            fake_engine_fn=wrap(self.fake_engine, self.schedule, role="fake"),
            fake_module_fn=wrap(self.fake_engine.module, self.schedule, role="fake"),
            teacher_fn=wrap(self.teacher.net, self.schedule, role="teacher"),
            schedule=self.schedule,
            fake_readout=self.family.discriminator_readout(self.fake_engine.module))

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

    # ----------------------------------------------------------------------------- one iteration
    def batch(self, noise_phase: int, accum_round: int, real_data: bool = False) -> Batch:
        """Micro-batch ``accum_round`` of this rank for the phase with noise key ``noise_phase`` (with
        ``real_data``: also the next real samples, latents on the device and their captions encoded)."""
        idx = rank_sample_indices(self.world, self.rank, self.micro, accum_round)
        noise = self.method.draw_noise(self.cfg.train.seed, self.step, noise_phase, idx, self.teacher.latent_shape,
                                       self.schedule, self.device)
        prompts, input_ids = self.prompts.batch(self.step, noise_phase, idx)
        cond = (self.teacher.conditioner.encode_ids(input_ids) if input_ids is not None
                else self.teacher.conditioner.encode(prompts))
        real = None
        if real_data:
            if self.real_data is None:
                raise ConfigError("the method reads real data but data.real_shards gave no source")
            pairs = self.real_data.batch(self.step, noise_phase, idx)
            x = pairs.x.to(self.device, non_blocking=True)
            if pairs.kind == "image":  # image shards: the teacher's VAE encodes them here (latent shards: already)
                # its posterior sample seeded by (seed, step, phase, first index): a resumed run draws the same
                g = torch.Generator(self.device).manual_seed(
                    sample_seed(self.cfg.train.seed, self.step, VAE_SAMPLE_PHASE + noise_phase, idx[0]))
                x = self.teacher.encode_images(x, g)
            real = (x, self.teacher.conditioner.encode(pairs.captions))
        return Batch(noise, cond, self.teacher.conditioner.empty(self.micro), real)

    @contextlib.contextmanager
    def _frozen(self, names: tuple[str, ...]) -> Iterator[None]:
        """The networks ``names`` frozen for a block (still in the autograd graph), each parameter's
        ``requires_grad`` restored afterwards as it was (a frozen LoRA base stays frozen)."""
        params = [p for n in names for p in self.networks[n].parameters()]
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:  # local work only
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)

    def _run_phase(self, phase: Phase, k: int, stats: dict[str, torch.Tensor]) -> bool:
        """One phase, accumulated over the micro-batches. Returns whether its optimizer step was applied."""
        engine = self.engines[phase.trains]
        leftovers = [self.engines[n] for n in phase.frozen]  # frozen ZeRO-3 engines gather in the backward
        with self._frozen(phase.frozen):
            for r in range(self.gas):
                loss, st = phase.loss(self.fns, self.batch(phase.noise_phase, r, phase.real_data), k, self.micro)
                engine.backward(loss)
                release_backward_leftovers(*leftovers)
                engine.step()
                for key, v in st.items():
                    if key not in phase.stat_reduce:
                        raise KeyError(f"phase {phase.name!r} returned statistic {key!r} without a declared reduction")
                    stats[key] = stats[key] + v.float() / (self.gas if phase.stat_reduce[key] == MEAN else 1)
        return engine.was_step_applied()

    def train_step(self) -> dict[str, torch.Tensor]:
        """The method's phases in order, each over the micro-batches, then the method's ``after_step``.
        fp16: a phase whose step the loss scaler skipped skips the later phases too (when the method says so)."""
        stats: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        k = self.method.step_count(self.cfg.train.seed, self.step)
        begin = getattr(self.method, "begin_step", None)  # optional: schedules in images seen
        if begin is not None:
            begin(self.images_seen)
        phases = self.method.phases
        applied: dict[str, bool] = {}
        times: dict[str, float] = {}
        inactive: set[str] = set()
        skip = False
        for i, phase in enumerate(phases):
            t0 = time.perf_counter()
            if phase.active is not None and not phase.active(self.images_seen):
                applied[phase.name] = False  # not run this iteration (a schedule), not an fp16 skip
                times[phase.name] = 0.0
                inactive.add(phase.name)
                continue
            applied[phase.name] = False if skip else self._run_phase(phase, k, stats)
            skip = skip or (self.method.skip_later_phases_on_overflow and not applied[phase.name])
            if i < len(phases) - 1:
                fault_injection.maybe_fail("mid_step", self.step + 1, self.rank)
            times[phase.name] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.method.after_step(applied, self.images_seen)
        if applied[phases[-1].name]:  # the last phase's time includes what follows it (the EMA)
            times[phases[-1].name] += time.perf_counter() - t0
        for phase in phases:
            stats[f"skipped_{phase.name}"] = torch.tensor(float(phase.name not in inactive and not applied[phase.name]))
            stats[f"time_{phase.name}"] = torch.tensor(times[phase.name])
        self.step += 1
        self.images_seen += self.cfg.train.global_batch
        return stats

    # ----------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        return self.checkpointer.save()

    def resume(self, path: Path, universal: Path | None = None) -> None:
        self.checkpointer.resume(path, universal)

    # ----------------------------------------------------------------------------- outputs (outputs.py)
    def sampling_meta(self) -> dict:
        return self.outputs.sampling_meta()

    def ema_network(self) -> contextlib.AbstractContextManager:
        return self.outputs.ema_network()

    ema_unet = ema_network  # the name before model families

    def ema_in_generator(self) -> contextlib.AbstractContextManager:
        return self.outputs.ema_in_generator()

    def generate_with(self, net: torch.nn.Module, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        return self.outputs.generate_with(net, prompts, seeds)

    def preview(self) -> None:
        self.outputs.preview()

    def export(self) -> Path | None:
        return self.outputs.export()

    # ----------------------------------------------------------------------------- loop
    def _log(self, stats: dict[str, torch.Tensor], seconds: float, steps: int) -> None:
        vals = reduce_over_ranks(stats, self.device, self.world)
        src_stats = self.prompts.stats()
        if self.real_data is not None:
            src_stats = {**src_stats, **{f"real_{k}": v for k, v in self.real_data.stats().items()}}
        if self.logger is None or not self.dist.is_main:
            return
        out = {
            **step_scalars(vals, self.world, self.method.stat_tags),
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
        window, window_start = StatsWindow(), time.perf_counter()
        try:
            while self.step < tc.max_steps:
                window.add(self.train_step())
                self.logger.step(self.step, self.images_seen)
                fault_injection.maybe_fail("after_step", self.step, self.rank)
                if self.step % tc.log_every == 0 or self.step == tc.max_steps:
                    self._log(window.means(), time.perf_counter() - window_start, window.steps)
                    window.clear()
                    window_start = time.perf_counter()
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
                repair_latest(self.run_dir, self.step)
            if tc.export_at_end:
                out = self.export()
                if out is not None:
                    self.logger.write(f"exported EMA generator to {out}")
            end_of_run(self)
            return True
        finally:
            self.logger.close()
            self.prompts.close()
            if self.real_data is not None:
                self.real_data.close()
