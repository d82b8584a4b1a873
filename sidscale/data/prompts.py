"""Prompt sources the trainer draws from: a webdataset stream, or an indexed list.

Both answer ``batch(step, phase, indices) -> (prompts, input_ids or None)`` and carry their
position in ``state_dict()``. The indexed source is a pure function of (seed, step, phase,
sample index), so a DeepSpeed run and the single-process reference loop see the same prompts
(used by the equivalence tests and benchmarks: ``data.shards: indexed:toy``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

from sidscale.core.noise import sample_seed
from sidscale.data.stream import StreamSource

INDEXED_PREFIX = "indexed:"


class IndexedPromptSource:
    def __init__(self, prompts: Sequence[str], seed: int):
        if not prompts:
            raise ValueError("IndexedPromptSource needs at least one prompt")
        self.prompts, self.seed = list(prompts), seed

    def prompts_for(self, step: int, phase: int, indices: Sequence[int]) -> list[str]:
        # +1 so the prompt choice is not correlated with the noise drawn from the same seed
        return [self.prompts[random.Random(sample_seed(self.seed + 1, step, phase, i)).randrange(len(self.prompts))]
                for i in indices]

    def batch(self, step: int, phase: int, indices: Sequence[int]) -> tuple[list[str], torch.Tensor | None]:
        return self.prompts_for(step, phase, indices), None

    def stats(self) -> dict[str, int]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass


class StreamPromptSource(StreamSource):
    """Sequential batches from a ``PromptStream`` (its own position is the data cursor)."""

    def __init__(self, shards: str, *, rank: int, world_size: int, batch_size: int, seed: int, num_workers: int,
                 shuffle_buffer: int, resampled: bool, tokenize: Callable[[list[str]], torch.Tensor] | None):
        from sidscale.config import ConfigError
        from sidscale.data.stream import PromptStream, first_prompt

        try:
            self.stream = PromptStream(shards, rank=rank, world_size=world_size, batch_size=batch_size, seed=seed,
                                       num_workers=num_workers, shuffle_buffer=shuffle_buffer, resampled=resampled,
                                       tokenize=tokenize)
        except (ValueError, FileNotFoundError) as e:  # the same on every rank: one message, before the run starts
            raise ConfigError(f"data.shards={shards!r}: {e}") from None
        # every shard corrupt / empty: said now, before config.yaml and tb/ are written, not by every
        # rank's loader after the run started (reads only up to the first good prompt)
        if first_prompt(self.stream.plan.shards) is None:
            raise ConfigError(f"data.shards={shards!r}: none of its {len(self.stream.plan.shards)} shards holds a "
                              f"readable prompt (each is corrupt, empty or has no .txt members; first: "
                              f"{self.stream.plan.shards[0]})")

    def batch(self, step: int, phase: int, indices: Sequence[int]) -> tuple[list[str], torch.Tensor | None]:
        b = next(self.stream)
        if len(b["prompts"]) != len(indices):
            raise RuntimeError(f"prompt stream gave {len(b['prompts'])} prompts, expected {len(indices)}")
        return b["prompts"], b.get("input_ids")
