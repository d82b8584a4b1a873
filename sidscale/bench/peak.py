"""The measured peak of the real Trainer on a bench case: the number the memory plan is checked against
(``tools/memory_plan.py --measure``). Bench tooling: the product's plan never runs a trainer."""

from __future__ import annotations

import torch

from sidscale.bench.cases import BenchCase
from sidscale.perf.measured_memory import cpu_allocation_trace


def measure_trainer_peak(case: BenchCase, dist_info, steps: int = 2) -> dict[str, float]:
    """Peak allocated bytes of this rank over ``steps`` iterations of the real ``Trainer`` on ``case``.

    Returns ``{"peak_bytes", "static_bytes"}``: the peak, and what stays allocated between
    iterations (parameters, master weights, optimizer states, EMA, teacher).
    """
    from sidscale.bench.bench import trainer_runner

    device = dist_info.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        runner = trainer_runner(case, dist_info)
        runner.step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            runner.step()
        torch.cuda.synchronize(device)
        out = {"peak_bytes": float(torch.cuda.max_memory_allocated(device) - base),
               "static_bytes": float(torch.cuda.memory_allocated(device) - base)}
    else:
        with cpu_allocation_trace() as trace:
            runner = trainer_runner(case, dist_info)
            runner.step()
            trace.mark()
            for _ in range(steps):
                runner.step()
        out = {"peak_bytes": float(trace.peak_bytes(after_marker=True)), "static_bytes": float(trace.final_bytes)}
    runner.close()
    return out
