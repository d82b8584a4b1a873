"""Measure SiD iterations of the real ``Trainer`` (and of the plain ``ReferenceLoop``), any preset kind.

A *runner* wraps one configuration: ``step()`` runs one full iteration. ``measure`` times runners
round-robin (one step of each in turn), so on a shared, noisy CPU every configuration sees the
same background load; ratios between runners of one call are the numbers to trust, not absolutes.
"""

from __future__ import annotations

import contextlib
import gc
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sidscale.bench.cases import BenchCase, case_config
from sidscale.core.precision import adam_eps, precision_context, uses_tf32
from sidscale.families.presets import build_preset_teacher
from sidscale.perf.flops import count_flops, gpu_peak_tflops, matmul_precision, mfu


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_memory() -> dict[str, float]:
    """Peak RSS of the process (ru_maxrss: KiB on Linux) and, with psutil, the current RSS."""
    out = {"host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30}
    with contextlib.suppress(ImportError):
        import psutil

        out["host_rss_gib"] = psutil.Process().memory_info().rss / 2**30
    return out


@dataclass
class Runner:
    name: str
    device: torch.device
    samples_per_step: int  # per rank
    step: Callable[[], dict[str, Any]]  # one iteration; returns phase times (s) when it knows them
    info: dict[str, Any] = field(default_factory=dict)
    close: Callable[[], None] = lambda: None
    times: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)

    def timed_step(self) -> None:
        sync(self.device)
        t0 = time.perf_counter()
        out = self.step()
        sync(self.device)
        self.times.append(time.perf_counter() - t0)
        for k, v in out.items():
            self.phases.setdefault(k, []).append(float(v))


def _synced(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    def wrapped() -> Any:
        sync(device)
        return fn()

    return wrapped


def trainer_runner(case: BenchCase, dist_info, seed: int = 0) -> Runner:
    """The DeepSpeed trainer on ``case`` (a fresh random-weight teacher of the preset)."""
    from sidscale.trainer import Trainer

    world = dist_info.world_size
    cfg = case_config(case, world, seed)
    teacher = build_preset_teacher(case.preset, dist_info.device, case.resolved_teacher_dtype(), seed)
    run_dir = tempfile.mkdtemp(prefix="sidscale-bench-run-")
    trainer = Trainer(cfg, run_dir, dist_info, teacher=teacher)
    # The trainer reads its phase clock right after was_step_applied(): syncing there makes the
    # phase split exact on CUDA (otherwise queued fake-step kernels are billed to the generator step).
    for engine in (trainer.fake_engine, trainer.gen_engine):
        engine.was_step_applied = _synced(engine.was_step_applied, dist_info.device)

    def step() -> dict[str, float]:
        # The Trainer applied its precision's flags at construction; re-enter them per step because
        # runners of different precisions (and the reference) may alternate in one process.
        with precision_context(case.precision):
            stats = trainer.train_step()
        return {"fake": float(stats["time_fake"]), "gen_and_ema": float(stats["time_gen"])}

    def close() -> None:
        nonlocal trainer
        trainer.prompts.close()
        del trainer

    info = {"zero": case.zero, "precision": case.precision, "micro_batch": case.micro_batch,
            "accumulation": case.accumulation, "grad_checkpointing": case.grad_checkpointing,
            "teacher_dtype": case.resolved_teacher_dtype(), "world_size": world, "tf32": uses_tf32(case.precision),
            "reduce_bucket_size": case.reduce_bucket_size, "compile": case.compile_backend}
    return Runner(case.label, dist_info.device, case.micro_batch * case.accumulation, step, info, close)


def reference_runner(preset: str, device: torch.device, batch: int, seed: int = 0) -> Runner:
    """The reference recipe: plain fp32 PyTorch ``ReferenceLoop``, no checkpointing, on ``batch`` samples,
    with the method settings and the teacher family of the benchmark's cases (``case_config``)."""
    import dataclasses

    from sidscale.data.prompts import IndexedPromptSource
    from sidscale.families.toy.mixture import ToyMixture
    from sidscale.method.sid_lsg import MethodSettings
    from sidscale.testing.reference import OptimSettings, ReferenceLoop

    cfg = case_config(BenchCase(preset, precision="fp32"), 1, seed)
    teacher = build_preset_teacher(preset, device, "fp32", seed)

    class DeviceReferenceLoop(ReferenceLoop):
        # NOTE: ReferenceLoop draws its noise on the CPU (it is the CPU numerical reference); move it.
        def _inputs(self, phase: int):
            noise, cond, uncond = super()._inputs(phase)
            moved = {f.name: None if getattr(noise, f.name) is None else getattr(noise, f.name).to(device)
                     for f in dataclasses.fields(noise)}
            return dataclasses.replace(noise, **moved), cond, uncond

    def opt(net) -> OptimSettings:
        return OptimSettings(net.lr, tuple(net.betas), adam_eps(net, "fp32"), net.weight_decay)

    prompts = IndexedPromptSource(ToyMixture().prompts, seed)
    loop = DeviceReferenceLoop(teacher.net, teacher.conditioner, teacher.schedule,
                               MethodSettings.from_config(cfg.method), opt(cfg.generator), opt(cfg.fake), batch,
                               teacher.latent_shape, seed, prompts.prompts_for,
                               prediction_fn=teacher.family.prediction_fn)
    del teacher  # the loop holds its own fp32 copies

    def step() -> dict[str, float]:
        # The reference recipe runs true fp32: no TF32 in matmuls or convolutions (sidscale/core/precision.py).
        with precision_context("fp32"):
            loop.step()
        return {}

    def close() -> None:
        nonlocal loop
        del loop

    info = {"precision": "fp32", "tf32": False, "micro_batch": batch, "grad_checkpointing": False, "world_size": 1}
    return Runner(f"{preset}/reference/fp32/mb{batch}", device, batch, step, info, close)


def measure(runners: list[Runner], warmup: int, steps: int) -> None:
    """Warm up each runner, then time ``steps`` iterations of each, round-robin."""
    for r in runners:
        for _ in range(warmup):
            r.step()
    sync(runners[0].device)
    if runners[0].device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runners[0].device)
    for _ in range(steps):
        for r in runners:
            r.timed_step()


def iteration_flops(runner: Runner) -> int:
    """FLOPs of one actual iteration (counted; it also advances the runner by one step)."""
    flops, _ = count_flops(runner.step)
    return flops


def net_forward_flops_per_sample(preset: str) -> int:
    """FLOPs of one denoiser forward (UNet or SD3 transformer) for one sample at the preset's latent size
    and text length (UNet: 77 tokens; SD3: 77 CLIP + the preset's T5 tokens), counted on the meta device
    with the inputs the memory plan uses (``preset_net_inputs``)."""
    from sidscale.families.presets import build_preset_net, preset_net_inputs

    net = build_preset_net(preset, "meta")
    args, kwargs = preset_net_inputs(preset, net, 1, "meta")
    with torch.no_grad():
        flops, _ = count_flops(lambda: net(*args, **kwargs, return_dict=False))
    return flops


def unet_forward_flops_per_sample(preset: str, device: torch.device | None = None) -> int:
    """Old name of ``net_forward_flops_per_sample`` (``device`` was never used: the count runs on meta)."""
    return net_forward_flops_per_sample(preset)


def summarize(runner: Runner, flops: int | None, net_fwd: int | None, peak_tflops: float | None,
              tf32: bool) -> dict[str, Any]:
    """One JSON-able record of a runner after ``measure``. ``net_fwd``: FLOPs of one denoiser forward per
    sample (``net_forward_flops_per_sample``): the iteration's FLOPs are also given in those units."""
    s_it = statistics.median(runner.times)
    rec: dict[str, Any] = {
        "config": runner.name, **runner.info, "device": str(runner.device), "steps": len(runner.times),
        "s_per_iter": s_it, "s_per_iter_mean": statistics.fmean(runner.times),
        "s_per_iter_min": min(runner.times),
        "phase_s": {k: statistics.median(v) for k, v in runner.phases.items()},
        "samples_per_s": runner.samples_per_step / s_it,
        "samples_per_iter": runner.samples_per_step,
    }
    rec["phase_s"]["other"] = max(0.0, s_it - sum(rec["phase_s"].values()))
    if runner.device.type == "cuda":
        rec["device_name"] = torch.cuda.get_device_name(runner.device)
        rec["device_peak_gib"] = torch.cuda.max_memory_allocated(runner.device) / 2**30
        rec["device_reserved_peak_gib"] = torch.cuda.max_memory_reserved(runner.device) / 2**30
    rec.update(host_memory())
    if flops is not None:
        rec["flops_per_iter"] = flops
        rec["achieved_tflops"] = flops / s_it / 1e12
        if net_fwd:
            rec["net_fwd_flops_per_sample"] = net_fwd
            rec["net_fwd_equivalents_per_sample"] = flops / (net_fwd * runner.samples_per_step)
        if peak_tflops is None and runner.device.type == "cuda":
            peak_tflops = gpu_peak_tflops(rec["device_name"], matmul_precision(runner.info["precision"], tf32))
        rec["peak_tflops"] = peak_tflops
        rec["mfu"] = mfu(flops, s_it, peak_tflops)
    return rec


def release(runner: Runner) -> None:
    runner.close()
    gc.collect()
    if runner.device.type == "cuda":
        torch.cuda.empty_cache()
