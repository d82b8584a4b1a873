"""Per-sample randomness of an iteration as a pure function of (seed, step, phase, sample index).

Each sample of the global batch gets its own generator seeded from a hash of those four
numbers. So the noises of sample i do not depend on how the global batch is split into ranks
and micro-batches, a resumed run draws exactly what the uninterrupted run drew, and the
plain single-process reference loop can replay a DeepSpeed run sample for sample.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from sidscale.method.sid_lsg import StepNoise

PHASE_FAKE = 0
PHASE_GEN = 1


def sample_seed(seed: int, step: int, phase: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{step}:{phase}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def draw_step_noise(
    seed: int, step: int, phase: int, indices: Sequence[int], shape: Sequence[int],
    t_min: int, t_max: int, prompt_dropout: float, device: torch.device | str = "cpu",
) -> StepNoise:
    """z, eps, t ~ UniformInt[t_min, t_max), dropout mask for the samples ``indices``."""
    zs, epss, ts, drops = [], [], [], []
    for i in indices:
        g = torch.Generator().manual_seed(sample_seed(seed, step, phase, int(i)))
        zs.append(torch.randn(tuple(shape), generator=g))
        epss.append(torch.randn(tuple(shape), generator=g))
        ts.append(torch.randint(t_min, t_max, (1,), generator=g))
        drops.append(torch.rand((1,), generator=g) < prompt_dropout)
    return StepNoise(
        z=torch.stack(zs).to(device), eps=torch.stack(epss).to(device),
        t=torch.cat(ts).to(device), drop=torch.cat(drops).to(device),
    )


def rank_sample_indices(world_size: int, rank: int, micro_batch: int, accum_round: int) -> list[int]:
    """Global sample indices of one micro-batch: round r of rank k covers a contiguous block.

    Layout of the global batch: [round 0: rank 0, rank 1, ...][round 1: ...]...
    """
    start = (accum_round * world_size + rank) * micro_batch
    return list(range(start, start + micro_batch))
