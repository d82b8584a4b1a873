"""What a distillation method declares to the trainer: its phases and what happens after a step.

The trainer (``sidscale/trainer.py``) runs, for each iteration, the method's ``phases`` in order, each
accumulated over the micro-batches of the global batch, then ``after_step``. It never looks at the
method's name or at its statistics' names: a new method (or phase) is a new module here plus one
entry in ``build_method``'s table, not an edit of the trainer.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch

from sidscale.errors import ConfigError

MEAN, SUM = "mean", "sum"  # how a statistic adds up over the micro-batches of one phase


@dataclass(frozen=True)
class PredictionFns:
    """The networks as the method calls them (``guidance.EpsFn``). ``*_engine_fn``: through the DeepSpeed
    engine's forward (the net trains in this call); ``*_module_fn``: through ``.module`` (only evaluated:
    the engine's hooks must not run for a net that does not train in the phase)."""

    gen_engine_fn: Callable
    gen_module_fn: Callable
    fake_engine_fn: Callable
    fake_module_fn: Callable
    teacher_fn: Callable
    schedule: Any
    # the fake net's feature read-out (``families/shared/readout.FeatureTap``): the adversarial method's
    # discriminator logits; None where no method reads it
    fake_readout: Any = None


class Batch(NamedTuple):
    """One micro-batch of a phase: its noise (``core.noise.StepNoise``) and conditionings; for a phase that
    reads real data (``Phase.real_data``), the real latents [B, C, H, W] and their captions' conditioning."""

    noise: Any
    cond: Any
    uncond: Any
    real: Any = None  # (latents, cond) or None


# (prediction functions, micro-batch, k, loss normaliser) -> (scalar loss, detached statistics)
LossFn = Callable[[PredictionFns, Batch, int, float], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class Phase:
    """One optimizer step of one network, accumulated over the micro-batches.

    ``name``: the phase's name in the logged statistics (``skipped_<name>``, ``time_<name>``).
    ``noise_phase``: the phase's key in the noise draw (``core.noise``: noise is a pure function of
    seed, step, this key and the sample index).
    ``trains``: the engine that steps. ``frozen``: the networks that take part in the autograd graph but
    must not train (their ``requires_grad`` flags are saved, set False, and restored afterwards).
    ``stat_reduce``: for each statistic the loss returns, ``MEAN`` or ``SUM`` over the micro-batches.
    ``real_data``: each micro-batch also carries real samples (``Batch.real``) from ``data.real_shards``.
    ``active``: whether the phase runs this iteration, from the images seen before it (None: always); an
    inactive phase draws no data, computes nothing and leaves its network and optimizer untouched."""

    name: str
    noise_phase: int
    trains: str
    loss: LossFn
    stat_reduce: Mapping[str, str]
    frozen: tuple[str, ...] = ()
    real_data: bool = False
    active: Callable[[int], bool] | None = None


class DistillMethod(Protocol):
    """A distillation method as the trainer runs it."""

    phases: tuple[Phase, ...]
    # fp16: when a phase's step is skipped by the loss scaler (overflow), the later phases skip too
    skip_later_phases_on_overflow: bool
    # stat -> (TensorBoard tag, summed over the job, value when absent): ``metrics.step_scalars``
    stat_tags: Mapping[str, tuple[str, bool, float | None]]

    def begin_step(self, images_seen: int) -> None:
        """Optional (the trainer calls it where it exists): before the phases of an iteration
        (``images_seen``: before it), for schedules in images seen."""
        ...

    def step_count(self, seed: int, step: int) -> int:
        """The k of this iteration (K-step generators), the same on every rank."""
        ...

    def draw_noise(self, seed: int, step: int, noise_phase: int, indices: torch.Tensor, latent_shape: tuple,
                   schedule: Any, device: torch.device) -> Any:
        """The noise of one micro-batch of the phase whose noise key is ``noise_phase`` (a pure function
        of its arguments)."""
        ...

    def after_step(self, applied: Mapping[str, bool], images_seen: int) -> None:
        """After every phase ran (``applied``: phase name -> whether its optimizer step was applied)."""
        ...


# method.name -> (module, class): a new method is its module plus one line here
METHODS: dict[str, tuple[str, str]] = {"sid_lsg": ("sidscale.method.sid", "SiD")}


def build_method(name: str, settings: Any, train_cfg: Any, ema: Any) -> DistillMethod:
    """The method of ``method.name``: ``METHODS`` maps the name to its module and class (imported here,
    so ``base`` stays below the methods it describes)."""
    if name not in METHODS:
        raise ConfigError(f"method.name = {name!r}: expected one of {', '.join(METHODS)}")
    module, cls = METHODS[name]
    return getattr(importlib.import_module(module), cls)(settings, train_cfg, ema)
