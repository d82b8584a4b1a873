"""Measured peak memory of real training iterations: what the allocator handed out, on CPU as on CUDA.

On CUDA this is ``torch.cuda.max_memory_allocated``. The CPU has no such counter, so the
allocation trace of the profiler (``profile_memory=True``) is replayed: every allocation and free
of a tensor's storage is an event with a signed size, and the running sum is the live tensor
bytes. Its maximum is the CPU counterpart of CUDA's peak-allocated. NOTE: process RSS would not
do: untouched pages of a ``torch.empty`` (DeepSpeed's 200M-element reduction buckets) never
become resident, although a GPU would have to hold them.

The trace starts before the teacher and the trainer are built, so it sees every tensor the run
owns; the peak is measured over ``steps`` full iterations after one warm-up iteration (Adam's
states appear at the first ``step()``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.autograd import DeviceType

MARKER_BYTES = 7919  # a prime number of bytes: no tensor of the run has this size


@dataclass
class AllocationTrace:
    """Signed allocation events ``(time_ns, bytes)`` of the CPU allocator, in time order."""

    events: list[tuple[int, int]] = field(default_factory=list)

    def live_bytes(self) -> list[int]:
        out, live = [], 0
        for _, n in self.events:
            live += n
            out.append(live)
        return out

    def peak_bytes(self, after_marker: bool = False) -> int:
        """Largest live total (counted from the trace's start), or only after the last ``mark()``."""
        live = self.live_bytes()
        start = 0
        if after_marker:
            start = max(i for i, (_, n) in enumerate(self.events) if n == MARKER_BYTES)
        return max(live[start:], default=0)

    @staticmethod
    def mark() -> None:
        """Put a recognisable allocation into the trace (a split point for ``peak_bytes``)."""
        torch.empty(MARKER_BYTES, dtype=torch.uint8)

    @property
    def final_bytes(self) -> int:
        return sum(n for _, n in self.events)


@contextlib.contextmanager
def cpu_allocation_trace() -> Iterator[AllocationTrace]:
    """Record every CPU tensor allocation and free made inside the block."""
    from torch.profiler import ProfilerActivity, profile

    trace = AllocationTrace()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield trace
    # NOTE: the "[memory]" records of the raw kineto results carry the signed byte counts; the
    # FunctionEvent view folds allocations into the op that made them and loses their order.
    trace.events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                          if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
