"""The generic train step over a method's phases, the method registry, and the checkpointer's registry of
stateful pieces: each checked on small stand-ins against values computed here, independently."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sidscale.checkpointing import files as ckpt_lib
from sidscale.checkpointing.manager import Checkpointer
from sidscale.checkpointing.states import CounterState, EngineState
from sidscale.errors import ConfigError
from sidscale.method.base import MEAN, SUM, Phase, build_method
from sidscale.trainer import Trainer


class _Engine:
    """Records backward/step; ``applied``: the loss scaler's verdict (False: fp16 overflow, step skipped)."""

    def __init__(self, name: str, log: list, applied: bool = True) -> None:
        self.name, self.log, self.applied = name, log, applied

    def backward(self, loss: torch.Tensor) -> None:
        self.log.append((self.name, "backward", float(loss)))

    def step(self) -> None:
        self.log.append((self.name, "step"))

    def was_step_applied(self) -> bool:
        return self.applied


class _Method:
    """Two phases ``a`` (trains ``x``) then ``b`` (trains ``y``, ``x`` frozen); round r's loss is r + 1."""

    skip_later_phases_on_overflow = True

    def __init__(self, log: list, frozen_seen: list, x: torch.nn.Module) -> None:
        self.log, self.after = log, []

        def loss(phase: str):
            def fn(fns, batch, k, normaliser):
                frozen_seen.append((phase, [p.requires_grad for p in x.parameters()]))
                v = torch.tensor(float(batch + 1))
                return v, {f"mean_{phase}": v * 2, f"sum_{phase}": v}
            return fn

        self.phases = (Phase("a", 0, trains="x", loss=loss("a"), stat_reduce={"mean_a": MEAN, "sum_a": SUM}),
                       Phase("b", 1, trains="y", loss=loss("b"), stat_reduce={"mean_b": MEAN, "sum_b": SUM},
                             frozen=("x",)))

    def step_count(self, seed: int, step: int) -> int:
        return 1

    def after_step(self, applied, images_seen: int) -> None:
        self.after.append((dict(applied), images_seen))


def _stub(x_applied: bool = True, y_applied: bool = True):
    log, frozen_seen = [], []
    x = torch.nn.Linear(2, 2)
    x.weight.requires_grad_(False)  # a frozen base (LoRA): must stay frozen after the phase that freezes x
    method = _Method(log, frozen_seen, x)
    stub = SimpleNamespace(
        device=torch.device("cpu"), method=method, gas=3, micro=2, rank=0, step=5, images_seen=40, fns=None,
        cfg=SimpleNamespace(train=SimpleNamespace(seed=0, global_batch=8)),
        engines={"x": _Engine("x", log, x_applied), "y": _Engine("y", log, y_applied)},
        networks={"x": x, "y": torch.nn.Linear(2, 2)})
    stub.batch = lambda noise_phase, r, real_data=False: r  # the "batch" of round r is r
    stub._frozen = lambda names: Trainer._frozen(stub, names)
    stub._run_phase = lambda phase, k, stats: Trainer._run_phase(stub, phase, k, stats)
    return stub, log, frozen_seen, x


def test_phases_run_in_order_with_their_declared_reductions_and_restore_each_flag() -> None:
    """Mutations that fail it: summing every stat (or averaging every stat), forcing requires_grad back to
    True after the phase, freezing nothing in phase b, running the phases in another order."""
    stub, log, frozen_seen, x = _stub()
    stats = Trainer.train_step(stub)
    # losses 1, 2, 3 over the three rounds: mean of 2x = 4, sum of x = 6
    assert {k: float(stats[k]) for k in ("mean_a", "sum_a", "mean_b", "sum_b")} == pytest.approx(
        {"mean_a": 4.0, "sum_a": 6.0, "mean_b": 4.0, "sum_b": 6.0})
    assert [e for e in log if e[1] == "backward"] == [
        ("x", "backward", 1.0), ("x", "backward", 2.0), ("x", "backward", 3.0),
        ("y", "backward", 1.0), ("y", "backward", 2.0), ("y", "backward", 3.0)]
    assert [flags for phase, flags in frozen_seen if phase == "a"] == [[False, True]] * 3
    assert [flags for phase, flags in frozen_seen if phase == "b"] == [[False, False]] * 3
    assert [p.requires_grad for p in x.parameters()] == [False, True]  # as before the step, not all True
    assert float(stats["skipped_a"]) == 0.0 and float(stats["skipped_b"]) == 0.0
    assert stub.method.after == [({"a": True, "b": True}, 40)] and (stub.step, stub.images_seen) == (6, 48)


def test_an_inactive_phase_does_not_run_and_is_not_an_overflow_skip() -> None:
    """A phase whose ``active`` says no (the adversarial warm-up) draws no batch and steps nothing; it is not
    logged as an fp16 skip; the method sees the images seen before the step (``begin_step``) and is told the
    phase was not applied. Mutations that fail it: ignoring ``active``, logging it as skipped, calling
    ``active`` with the images seen after the step."""
    import dataclasses

    stub, log, _, _ = _stub()
    seen = []
    stub.method.begin_step = seen.append
    a, b = stub.method.phases
    stub.method.phases = (a, dataclasses.replace(b, active=lambda n: n > 40))
    stats = Trainer.train_step(stub)
    assert not [e for e in log if e[0] == "y"] and seen == [40]
    assert float(stats["skipped_b"]) == 0.0 and "mean_b" not in stats
    assert stub.method.after == [({"a": True, "b": False}, 40)]
    stats = Trainer.train_step(stub)  # images seen 48 > 40: b runs
    assert [e for e in log if e[0] == "y"] and seen == [40, 48] and float(stats["sum_b"]) == 6.0


def test_an_overflow_skips_the_later_phases_and_after_step_is_told() -> None:
    """Mutation that fails it: running phase b after phase a's step was skipped."""
    stub, log, _, _ = _stub(x_applied=False)
    stats = Trainer.train_step(stub)
    assert not [e for e in log if e[0] == "y"]
    assert float(stats["skipped_a"]) == 1.0 and float(stats["skipped_b"]) == 1.0
    assert stub.method.after == [({"a": False, "b": False}, 40)]


def test_a_statistic_without_a_declared_reduction_is_refused() -> None:
    """Mutation that fails it: a default reduction for undeclared statistics (by key prefix, say)."""
    stub, *_ = _stub()
    phase = stub.method.phases[0]
    stub.method.phases = (Phase("a", 0, trains="x", loss=phase.loss, stat_reduce={"mean_a": MEAN}),)
    with pytest.raises(KeyError, match="sum_a"):
        Trainer.train_step(stub)


def test_method_name_is_dispatched_and_an_unknown_one_names_the_key() -> None:
    from sidscale.method.sid import SiD
    from sidscale.method.sid_lsg import MethodSettings

    method = build_method("sid_lsg", MethodSettings(), SimpleNamespace(), ema=None)
    assert isinstance(method, SiD) and [p.name for p in method.phases] == ["fake", "gen"]
    assert method.phases[1].frozen[0] == "fake" and method.phases[0].frozen == ()
    with pytest.raises(ConfigError, match="method.name = 'dmd'"):
        build_method("dmd", MethodSettings(), SimpleNamespace(), ema=None)


class _Discriminator:
    """A new stateful piece: one more entry of the registry, its own key in the rank file and meta.json."""

    def __init__(self, value: float) -> None:
        self.weight = torch.full((3,), value)

    def save(self) -> dict:
        return {"disc": {"weight": self.weight.clone()}}

    def load(self, state: dict, path: Path) -> None:
        self.weight = state["disc"]["weight"].clone()

    def load_resharded(self, states, meta, path, rank, is_main) -> None:
        self.load(states[rank % len(states)], path)

    def meta(self) -> dict:
        return {"disc_numel": self.weight.numel()}


class _DirEngine:
    """Writes a shard where DeepSpeed would; loads report success; an optimizer with one param group."""

    def __init__(self, calls: list) -> None:
        self.calls = calls
        self.optimizer = SimpleNamespace(param_groups=[{"lr": 0.5}])

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        self.calls.append((tag, dict(client_state), save_latest))
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"x")

    def load_checkpoint(self, load_dir, tag):
        self.calls.append(("load", tag))
        return Path(load_dir) / tag, {}


def _engines(calls: list) -> dict:
    return {tag: EngineState(_DirEngine(calls), 1.0, f"{tag}.lr") for tag in ("generator", "fake")}


def test_a_new_state_is_one_registry_entry_saved_verified_and_resumed(tmp_path) -> None:
    """Mutations that fail it: a Checkpointer that saves only its built-in keys, or that skips a piece at load."""
    run = tmp_path / "run"
    counters = SimpleNamespace(step=3, images_seen=24)
    calls: list = []

    def checkpointer(disc: _Discriminator) -> Checkpointer:
        return Checkpointer(run, rank=0, world=1, is_main=True, engines=_engines(calls),
                            states={"disc": disc, "trainer": CounterState(counters)},
                            run_meta=lambda: {"world_size": 1}, keep_last=2, step=lambda: counters.step)

    path = checkpointer(_Discriminator(2.5)).save()
    assert path == ckpt_lib.step_dir(run, 3) and ckpt_lib.is_complete(path) and ckpt_lib.verify_share(path, 0, 1) == []
    saved = torch.load(ckpt_lib.rank_file(path, 0), weights_only=False)
    assert set(saved) == {"disc", "step", "images_seen"} and torch.equal(saved["disc"]["weight"], torch.full((3,), 2.5))
    meta = ckpt_lib.read_meta(path)
    assert (meta["disc_numel"], meta["step"], meta["images_seen"], meta["world_size"]) == (3, 3, 24, 1)
    fresh, counters.step, counters.images_seen = _Discriminator(0.0), 0, 0
    checkpointer(fresh).resume(path)
    assert torch.equal(fresh.weight, torch.full((3,), 2.5)) and (counters.step, counters.images_seen) == (3, 24)
    # the engines: saved under their tags with the step counters as client state, loaded back in order
    client = {"step": 3, "images_seen": 24}
    assert calls == [("generator", client, False), ("fake", client, False), ("load", "generator"), ("load", "fake")]


def test_sids_logged_scalars_when_every_generator_phase_was_skipped() -> None:
    """The TensorBoard names and scales of SiD's statistics (dropped counts are job totals: x ranks); the
    generator's absent ones logged as NaN / 0; an undeclared one under ``method/``.
    Mutations that fail it: no scaling by the ranks, a missing default, an undeclared stat dropped."""
    import math

    from sidscale.method.sid import SiD
    from sidscale.metrics import step_scalars

    vals = {"loss_fake": 1.5, "dropped_fake": 0.5, "skipped_fake": 1.0, "skipped_gen": 1.0, "time_fake": 2.0,
            "time_gen": 0.0, "extra": 7.0}
    out = step_scalars(vals, 4, SiD.stat_tags)
    assert math.isnan(out.pop("loss/gen")) and math.isnan(out.pop("gen/w_mean"))
    assert out == {"loss/fake": 1.5, "nan/dropped_fake": 2.0, "nan/dropped_gen": 0.0, "fp16/skipped_fake": 1.0,
                   "fp16/skipped_gen": 1.0, "time/fake_step_s": 2.0, "time/gen_step_s": 0.0, "method/extra": 7.0}
