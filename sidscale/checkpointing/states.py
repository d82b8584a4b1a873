"""The stateful pieces a checkpoint holds, one small adapter each (the ``Checkpointer``'s registry).

Two kinds, matching the on-disk layout (``checkpointing/files.py``):
- ``EngineState``: a DeepSpeed engine, in its own directory ``<tag>/`` of the step directory;
- a ``RankState``: owns some top-level keys of each rank's ``rank_XXXXX.pt`` (and, optionally, some
  keys of ``meta.json``). It saves this rank's part, loads it back, and loads it from the files of
  another number of ranks (elastic resume).
Adding a piece (a discriminator and its optimizer, an LR schedule, a second EMA) is one entry in the
trainer's ``states``: an ``EngineState`` for an engine, a ``RankState`` for anything else.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from sidscale.checkpointing import files as ckpt_lib
from sidscale.distributed.sharded_ema import EMALayoutError


@dataclass
class EngineState:
    """A DeepSpeed engine saved under ``tag`` (its directory) with its configured LR re-applied at load."""

    engine: Any
    lr: float
    lr_key: str  # the config key named in the LR message (``generator.lr``)


class RankState(Protocol):
    def save(self) -> dict: ...  # this rank's keys of rank_XXXXX.pt

    def load(self, state: dict, path: Path) -> None: ...  # from this rank's rank file of checkpoint ``path``

    def load_resharded(self, states: list[dict], meta: dict, path: Path, rank: int, is_main: bool) -> None: ...

    def meta(self) -> dict: ...  # its keys of meta.json (rank 0)


class EMAState:
    """The generator's sharded EMA (``sharded_ema.ShardedEMA``): key ``ema``; meta ``ema_names`` / ``ema_shapes``."""

    def __init__(self, ema: Any) -> None:
        self.ema = ema

    def save(self) -> dict:
        return {"ema": self.ema.state_dict()}

    def load(self, state: dict, path: Path) -> None:
        try:
            self.ema.load_state_dict(state["ema"])
        except EMALayoutError:  # a checkpoint of an older sidscale: reassemble its EMA, take this rank's part
            self.ema.load_full(ckpt_lib.full_ema_from_checkpoint(path))

    def load_resharded(self, states: list[dict], meta: dict, path: Path, rank: int, is_main: bool) -> None:
        self.ema.load_resharded([s["ema"] for s in states], meta["ema_names"], f"checkpoint {path}")

    def meta(self) -> dict:
        shapes = [list(tuple(getattr(p, "ds_shape", p.shape))) for p in self.ema.params]
        return {"ema_names": self.ema.names, "ema_shapes": shapes}


class RNGState:
    """The host RNGs (torch, numpy, python) and this rank's own GPU's: key ``rng``. An elastic resume
    takes old rank (rank mod writers)'s states."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def save(self) -> dict:
        state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            # NOTE: this rank's own GPU only: get_rng_state_all() would open a CUDA context (hundreds
            # of MB) on every GPU of the node from every rank.
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"rng": state}

    def load(self, state: dict, path: Path) -> None:
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def load_resharded(self, states: list[dict], meta: dict, path: Path, rank: int, is_main: bool) -> None:
        self.load(states[rank % len(states)], path)

    def meta(self) -> dict:
        return {}


class DataState:
    """The prompt source's cursor: key ``data``. Elastic: the writers' stream states merged for this rank."""

    key = "data"

    def __init__(self, source: Any) -> None:
        self.source = source

    def save(self) -> dict:
        return {self.key: self.source.state_dict()}

    def load(self, state: dict, path: Path) -> None:
        self.source.load_state_dict(state[self.key])

    def load_resharded(self, states: list[dict], meta: dict, path: Path, rank: int, is_main: bool) -> None:
        from sidscale.checkpointing import elastic
        from sidscale.data.stream import DataWarning

        with warnings.catch_warnings():
            if not is_main:  # one DataWarning for the job, not one per rank
                warnings.simplefilter("ignore", DataWarning)
            self.source.load_state_dict(elastic.merged_stream_state([s[self.key] for s in states], rank))

    def meta(self) -> dict:
        return {}


class RealDataState(DataState):
    """The real-pair stream's cursor (``method.adversarial``): key ``real_data``, saved, loaded and merged on
    an elastic resume like the prompt cursor. A checkpoint without it (written with the adversarial method
    off) starts the real stream at its beginning, with a ``DataWarning``."""

    key = "real_data"

    def load(self, state: dict, path: Path) -> None:
        if self.key in state:
            super().load(state, path)
        else:
            self._fresh(path)

    def load_resharded(self, states: list[dict], meta: dict, path: Path, rank: int, is_main: bool) -> None:
        if all(self.key in s for s in states):
            super().load_resharded(states, meta, path, rank, is_main)
        elif is_main:
            self._fresh(path)

    def _fresh(self, path: Path) -> None:
        from sidscale.data.stream import DataWarning

        warnings.warn(f"checkpoint {path} holds no real-pair cursor (written with method.adversarial off): "
                      "the real-pair stream starts at its beginning", DataWarning, stacklevel=3)


class CounterState:
    """Step counters (``step``, ``images_seen``) read from and written to an owner's attributes: top-level
    keys of the rank file and of meta.json. ``extra_meta``: more meta.json keys of the owner (sampling)."""

    def __init__(self, owner: Any, names: tuple[str, ...] = ("step", "images_seen"),
                 extra_meta: Callable[[], dict] | None = None) -> None:
        self.owner, self.names, self.extra_meta = owner, names, extra_meta

    def save(self) -> dict:
        return {n: getattr(self.owner, n) for n in self.names}

    def load(self, state: dict, path: Path) -> None:
        for n in self.names:
            setattr(self.owner, n, int(state[n]))

    def load_resharded(self, states: list[dict], meta: dict, path: Path, rank: int, is_main: bool) -> None:
        self.load(states[rank % len(states)], path)

    def meta(self) -> dict:
        return {**self.save(), **(self.extra_meta() if self.extra_meta is not None else {})}
