"""Per-sample randomness of an iteration as a pure function of (seed, step, phase, sample index).

Each sample of the global batch gets its own generator seeded from a hash of those four
numbers. So the noises of sample i do not depend on how the global batch is split into ranks
and micro-batches, a resumed run draws exactly what the uninterrupted run drew, and the
plain single-process reference loop can replay a DeepSpeed run sample for sample.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# draws one sample's loss noise level (shape [1]) from its generator: NoiseSchedule.draw_loss_level
LevelDraw = Callable[[torch.Generator], torch.Tensor]

@dataclass
class StepNoise:
    """Everything random in one phase of one iteration, per sample."""

    z: torch.Tensor  # generator input noise [B, C, H, W]
    eps: torch.Tensor  # forward-process noise [B, C, H, W]
    t: torch.Tensor  # timesteps [B], long
    drop: torch.Tensor  # prompt dropout mask [B], bool (used by the fake step only)
    # the fresh noises of generator steps 2..K [B, K-1, C, H, W]; None for a one-step generator
    z_more: torch.Tensor | None = None

    def generator_noises(self, steps: int) -> list[torch.Tensor]:
        """The noise injected at each of the first ``steps`` generator steps (step 1: ``z``)."""
        if steps > 1 and (self.z_more is None or self.z_more.shape[1] < steps - 1):
            raise ValueError(f"{steps} generator steps need {steps - 1} extra noises, have "
                             f"{0 if self.z_more is None else self.z_more.shape[1]}")
        return [self.z] + [self.z_more[:, i] for i in range(steps - 1)]


PHASE_FAKE = 0
PHASE_GEN = 1


def sample_seed(seed: int, step: int, phase: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{step}:{phase}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def uniform_timesteps(t_min: int, t_max: int) -> LevelDraw:
    """t ~ UniformInt{t_min .. t_max-1} (the VP schedule's draw, for callers without a schedule)."""
    return lambda g: torch.randint(t_min, t_max, (1,), generator=g)


def draw_step_noise(
    seed: int, step: int, phase: int, indices: Sequence[int], shape: Sequence[int],
    draw_level: LevelDraw, prompt_dropout: float, device: torch.device | str = "cpu",
    generator_steps: int = 1,
) -> StepNoise:
    """z, eps, the loss level, the dropout mask and (K > 1) the K-1 fresh generator noises of the
    samples ``indices``. The extra noises are drawn last, so K = 1 draws exactly what it always did."""
    zs, epss, ts, drops, more = [], [], [], [], []
    for i in indices:
        g = torch.Generator().manual_seed(sample_seed(seed, step, phase, int(i)))
        zs.append(torch.randn(tuple(shape), generator=g))
        epss.append(torch.randn(tuple(shape), generator=g))
        ts.append(draw_level(g))
        drops.append(torch.rand((1,), generator=g) < prompt_dropout)
        if generator_steps > 1:
            more.append(torch.randn((generator_steps - 1, *shape), generator=g))
    return StepNoise(
        z=torch.stack(zs).to(device), eps=torch.stack(epss).to(device),
        t=torch.cat(ts).to(device), drop=torch.cat(drops).to(device),
        z_more=torch.stack(more).to(device) if more else None,
    )


def generator_step_count(seed: int, step: int, generator_steps: int) -> int:
    """The k in 1..K of iteration ``step``: how many generator steps both phases run (the loss is on
    step k's output). A hash of (seed, step), so every rank and a resumed run agree without a
    collective (SiD-DiT broadcasts rank 0's draw; this is the same uniform mixture)."""
    if generator_steps == 1:
        return 1
    digest = hashlib.blake2b(f"{seed}:{step}:generator-steps".encode(), digest_size=8).digest()
    return 1 + int.from_bytes(digest, "little") % generator_steps


def rank_sample_indices(world_size: int, rank: int, micro_batch: int, accum_round: int) -> list[int]:
    """Global sample indices of one micro-batch: round r of rank k covers a contiguous block.

    Layout of the global batch: [round 0: rank 0, rank 1, ...][round 1: ...]...
    """
    start = (accum_round * world_size + rank) * micro_batch
    return list(range(start, start + micro_batch))
