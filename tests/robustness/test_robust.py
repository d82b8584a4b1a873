"""Production-path rules that a CPU (gloo) run cannot show by itself, checked structurally.

- Every collective goes through sidscale.distributed.comm, which hands torch.distributed tensors on
  the communication device (cuda under NCCL: a CPU tensor fails there at the first call).
- NCCL start-up: the GPU is selected before the process group exists (object collectives and the
  barrier use the current device), the timeout is the config's ``dist.timeout_s``, and NCCL's
  async error handling is on.
- Checkpoint decisions are rank 0's, broadcast; a re-save first invalidates the old meta.json.
- DeepSpeed outside the tested range fails at start-up with a clear message.
- slurm/distill.sh requeues only a requested stop (75), never a crash.
"""

from __future__ import annotations

import ast
import configparser
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from sidscale import trainer as train
from sidscale.checkpointing import files as ckpt_lib
from sidscale.checkpointing.manager import Checkpointer
from sidscale.checkpointing.states import EngineState
from sidscale.config import ConfigError, load_config, validate
from sidscale.distributed import comm, runtime
from sidscale.distributed.preemption import StopSignal

REPO = Path(__file__).resolve().parents[2]

# torch.distributed's (and deepspeed.comm's) communication calls.
COLLECTIVES = {
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_object", "all_gather_into_tensor",
    "all_gather_coalesced", "_all_gather_base", "all_to_all", "all_to_all_single", "barrier", "monitored_barrier",
    "broadcast", "broadcast_object_list", "gather", "gather_object", "reduce", "reduce_scatter",
    "reduce_scatter_tensor", "_reduce_scatter_base", "scatter", "scatter_object_list", "send", "recv", "isend",
    "irecv", "batch_isend_irecv", "send_object_list", "recv_object_list", "inference_all_reduce",
}
DIST_MODULES = {"torch.distributed", "deepspeed.comm"}


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def direct_collectives(source: str, name: str = "<src>") -> list[str]:
    """Uses of a torch.distributed / deepspeed.comm collective in ``source``, however imported."""
    tree = ast.parse(source)
    aliases, hits = set(DIST_MODULES), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name in DIST_MODULES and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if f"{node.module}.{a.name}" in DIST_MODULES:
                    aliases.add(a.asname or a.name)
                elif node.module in DIST_MODULES and a.name in COLLECTIVES:
                    hits.append(f"{name}:{node.lineno}: from {node.module} import {a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and _dotted(node.value) in aliases:
            hits.append(f"{name}:{node.lineno}: {_dotted(node.value)}.{node.attr}")
    return hits


def test_the_checker_finds_every_import_style() -> None:
    src = "\n".join([
        "import torch.distributed as dist", "import torch", "import deepspeed",
        "from torch import distributed as td", "from deepspeed import comm as dscomm",
        "from torch.distributed import broadcast_object_list",
        "dist.all_reduce(x)", "torch.distributed.barrier()", "td.all_gather_object(a, b)",
        "dscomm.all_reduce(y)", "deepspeed.comm.broadcast(z, 0)",
        "dist.get_rank()", "dist.is_initialized()",  # not collectives
    ])
    hits = direct_collectives(src)
    assert len(hits) == 6, hits
    assert not any("get_rank" in h or "is_initialized" in h for h in hits)


def test_no_module_calls_collectives_outside_comm() -> None:
    """The structural rule: a collective anywhere else could hand NCCL a CPU tensor."""
    exempt = {REPO / "sidscale" / "distributed" / "comm.py"}
    files = sorted(p for d in ("sidscale", "tools") for p in (REPO / d).rglob("*.py") if p not in exempt)
    assert len(files) > 30
    hits = [h for p in files for h in direct_collectives(p.read_text(), str(p.relative_to(REPO)))]
    assert not hits, "call these through sidscale.distributed.comm instead:\n" + "\n".join(hits)


# ----------------------------------------------------------------------------------- comm device


def test_comm_device_follows_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    assert comm.comm_device() == torch.device("cpu")  # no process group
    monkeypatch.setattr(comm, "is_distributed", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    for backend, want in (("nccl", torch.device("cuda", 3)), ("gloo", torch.device("cpu")),
                          ("cpu:gloo,cuda:nccl", torch.device("cpu"))):
        monkeypatch.setattr(dist, "get_backend", lambda group=None, b=backend: b)
        assert comm.comm_device() == want, backend


class _Recorded(Exception):
    """Raised by the fake collectives once they saw their arguments (a meta tensor has no values)."""


@pytest.fixture
def fake_nccl(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, torch.device]]:
    """A 2-rank process group whose comm device is ``meta`` (standing in for cuda: any tensor left
    on the CPU shows up as cpu); each torch.distributed call records the device it was given."""
    seen: list[tuple[str, torch.device]] = []
    monkeypatch.setattr(comm, "is_distributed", lambda: True)
    monkeypatch.setattr(comm, "world_size", lambda: 2)
    monkeypatch.setattr(comm, "rank", lambda: 0)
    monkeypatch.setattr(comm, "comm_device", lambda: torch.device("meta"))

    def tensor_op(name):
        def op(*args, **kwargs):
            t = args[1] if name == "all_gather" else args[0]
            seen.append((name, t.device))
            raise _Recorded
        return op

    def broadcast_object_list(box, src=0, group=None, device=None):
        seen.append(("broadcast_object_list", torch.device(device) if device is not None else None))
        raise _Recorded

    monkeypatch.setattr(dist, "all_reduce", tensor_op("all_reduce"))
    monkeypatch.setattr(dist, "all_gather", tensor_op("all_gather"))
    monkeypatch.setattr(dist, "gather", tensor_op("gather"))
    monkeypatch.setattr(dist, "broadcast_object_list", broadcast_object_list)
    return seen


def test_collectives_get_tensors_on_the_comm_device(fake_nccl, monkeypatch: pytest.MonkeyPatch) -> None:
    stop = StopSignal(signals=())
    calls = {
        "all_ranks_agree": lambda: comm.all_ranks_agree(True),
        "StopSignal.stop_requested": stop.stop_requested,  # polled every training step
        "all_reduce(cpu tensor)": lambda: comm.all_reduce(torch.ones(3)),
        "gather_to_rank0": lambda: comm.gather_to_rank0(torch.ones(3)),  # the EMA's gather (previews, export)
        "broadcast_object": lambda: comm.broadcast_object({"a": 1}),
        "decide_on_rank0": lambda: comm.decide_on_rank0(lambda: True),  # checkpoint decisions
    }
    for what, call in calls.items():
        fake_nccl.clear()
        with pytest.raises(_Recorded):
            call()
        assert [d for _, d in fake_nccl] == [torch.device("meta")], f"{what}: {fake_nccl}"


def test_all_gather_returns_parts_on_the_callers_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU tensor (e.g. a ZeRO-Offload partition) travels via the comm device and comes back."""
    monkeypatch.setattr(comm, "is_distributed", lambda: True)
    monkeypatch.setattr(comm, "world_size", lambda: 2)
    monkeypatch.setattr(comm, "comm_device", lambda: torch.device("cpu"))
    sent = []

    def all_gather(parts, t):
        sent.append(t.device)
        for i, p in enumerate(parts):
            p.copy_(t + i)

    monkeypatch.setattr(dist, "all_gather", all_gather)
    x = torch.arange(3.0)
    parts = comm.all_gather(x)
    assert sent == [torch.device("cpu")] and [p.device for p in parts] == [x.device] * 2
    assert torch.equal(parts[1], x + 1) and torch.equal(x, torch.arange(3.0))


# ----------------------------------------------------------------------------------- start-up


class _FakeAccelerator:
    def __init__(self, events: list):
        self.events = events

    def device_name(self, index=None):
        return "cuda" if index is None else f"cuda:{index}"

    def communication_backend_name(self):
        return "nccl"

    def set_device(self, index):
        self.events.append(("set_device", index))


@pytest.fixture
def rank_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """RANK/LOCAL_RANK/... set (so init_distributed adds nothing) and restored afterwards."""
    for k, v in dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "x")
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING")


def test_nccl_start_up_selects_the_gpu_first_and_uses_the_config_timeout(rank_env, monkeypatch) -> None:
    import deepspeed
    import deepspeed.accelerator

    events: list = []
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: _FakeAccelerator(events))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)

    def init(dist_backend=None, timeout=None, **kw):
        events.append(("init", dist_backend, timeout, os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING")))

    monkeypatch.setattr(deepspeed, "init_distributed", init)
    cfg = load_config("toy", ["dist.timeout_s=90"])
    info = runtime.init_distributed(timeout_s=cfg.dist.timeout_s)
    assert events == [("set_device", 1), ("init", "nccl", datetime.timedelta(seconds=90), "3")]
    assert info.device == torch.device("cuda", 1) and info.local_rank == 1


def test_dist_timeout_config() -> None:
    cfg = load_config("toy")
    assert cfg.dist.timeout_s == 600 == runtime.DEFAULT_TIMEOUT_S
    with pytest.raises(ConfigError, match=r"dist\.timeout_s = 5: expected seconds >= 10"):
        validate(load_config("toy", ["dist.timeout_s=5"]))
    with pytest.raises(ConfigError, match=r"dist\.timeout_s"):
        load_config("toy", ["dist.timeout_s=soon"])


def test_deepspeed_outside_the_tested_range_fails_clearly(rank_env, monkeypatch) -> None:
    import importlib.metadata

    import deepspeed

    assert runtime.check_deepspeed_version() == importlib.metadata.version("deepspeed")  # the tested one
    for ok in ("0.19.8", "0.19.12"):
        assert runtime.check_deepspeed_version(ok) == ok
    for bad in ("0.19.7", "0.20.0", "1.0.0", "not-a-version"):
        with pytest.raises(runtime.DeepSpeedVersionError) as info:
            runtime.check_deepspeed_version(bad)
        msg = str(info.value)
        assert f"installed deepspeed {bad} is outside the tested range" in msg
        assert ">=0.19.8" in msg and "<0.20" in msg

    # At start-up, before any process group: init_distributed reads the installed version.
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.21.3" if name == "deepspeed" else "0")
    started = []
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: started.append(kw))
    with pytest.raises(runtime.DeepSpeedVersionError, match=r"deepspeed 0\.21\.3 is outside"):
        runtime.init_distributed()
    assert not started
    monkeypatch.setenv(runtime.ALLOW_UNTESTED_DEEPSPEED_ENV, "1")  # explicit opt-in: a warning only
    assert runtime.check_deepspeed_version() == "0.21.3"


def test_setup_cfg_pins_the_checked_range() -> None:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    reqs = [Requirement(line) for line in cfg["options"]["install_requires"].split("\n") if line.strip()]
    (ds,) = [r for r in reqs if r.name == "deepspeed"]
    assert ds.specifier == SpecifierSet(",".join(runtime.DEEPSPEED_SUPPORTED))


# ----------------------------------------------------------------------------------- checkpoints


def _complete_checkpoint(path: Path) -> None:
    for tag in ckpt_lib.ENGINE_TAGS:
        (path / tag).mkdir(parents=True)
        (path / tag / "shard.pt").write_bytes(b"old")
    torch.save({"step": 2}, ckpt_lib.rank_file(path, 0))
    (path / ckpt_lib.META).write_text(json.dumps({"step": 2, "world_size": 1}))
    assert ckpt_lib.is_complete(path)


def test_resave_invalidates_the_old_checkpoint_before_any_rank_writes(tmp_path, monkeypatch) -> None:
    """A re-save of an existing step that dies half-way must not leave a complete-looking mix."""
    path = tmp_path / "checkpoints" / "step_00000002"
    _complete_checkpoint(path)
    events = []
    monkeypatch.setattr(comm, "barrier", lambda: events.append(("barrier", (path / ckpt_lib.META).exists())))

    class DiesMidSave:
        def save_checkpoint(self, save_dir, tag, **kw):
            events.append(("write", (path / ckpt_lib.META).exists()))
            (Path(save_dir) / tag / "shard.pt").write_bytes(b"new, half")
            raise OSError(28, "No space left on device")

    stub = Checkpointer(tmp_path, rank=0, world=1, is_main=True,
                        engines={"generator": EngineState(DiesMidSave(), 0.0, "generator.lr"),
                                 "fake": EngineState(DiesMidSave(), 0.0, "fake.lr")},
                        states={}, run_meta=dict, keep_last=1, step=lambda: 2)
    with pytest.raises(OSError):
        stub._save(path)
    # meta.json was gone before the barrier that releases the writers, so no rank wrote under it
    assert events == [("barrier", False), ("write", False)]
    assert not ckpt_lib.is_complete(path)


class _NullLogger:
    def __init__(self, *a, **kw):
        pass

    def step(self, *a):
        pass

    def write(self, *a):
        pass

    def end_progress(self):
        pass

    def close(self):
        pass


def _stub_trainer(run_dir: Path, step: int, max_steps: int, saves: list) -> SimpleNamespace:
    cfg = SimpleNamespace(
        train=SimpleNamespace(max_steps=max_steps, global_batch=8, log_every=100, preview_every=100,
                              ckpt_every=100, export_at_end=False),
        teacher=SimpleNamespace(kind="sd", is_toy=False), eval=SimpleNamespace(num_samples=0))
    stub = SimpleNamespace(cfg=cfg, run_dir=run_dir, step=step, images_seen=0, rank=1,
                           dist=SimpleNamespace(is_main=False), schedule=None,
                           settings=SimpleNamespace(generator_steps=1),
                           prompts=SimpleNamespace(close=lambda: None), real_data=None)

    def train_step():
        stub.step += 1
        return {}

    stub.train_step = train_step
    stub.save_checkpoint = lambda: saves.append(stub.step)
    return stub


@pytest.mark.parametrize("path", ["end", "stop"])
def test_checkpoint_decisions_are_rank0s(path, tmp_path, monkeypatch) -> None:
    """Simulated rank 1, whose filesystem view says the step's checkpoint is complete while rank 0
    (the broadcast) says it is not: rank 1 must follow rank 0 into save_checkpoint's collectives,
    and must not even consult its own view."""
    monkeypatch.delenv("SIDSCALE_FAULT", raising=False)
    monkeypatch.setattr(train, "RunLogger", _NullLogger)
    monkeypatch.setattr(comm, "is_distributed", lambda: True)
    monkeypatch.setattr(comm, "rank", lambda: 1)
    monkeypatch.setattr(comm, "comm_device", lambda: torch.device("cpu"))
    own_view = []
    monkeypatch.setattr(ckpt_lib, "is_complete", lambda p: own_view.append(p) or True)

    def broadcast_object_list(box, src=0, group=None, device=None):
        assert src == 0
        box[0] = False  # rank 0's answer

    monkeypatch.setattr(dist, "broadcast_object_list", broadcast_object_list)
    saves: list[int] = []
    if path == "end":
        stub = _stub_trainer(tmp_path, step=4, max_steps=4, saves=saves)
        assert train.Trainer.run(stub) is True
    else:
        stub = _stub_trainer(tmp_path, step=1, max_steps=4, saves=saves)
        assert train.Trainer.run(stub, SimpleNamespace(stop_requested=lambda: True)) is False
    assert saves == [stub.step] and own_view == []


def test_comm_check_on_two_gloo_ranks() -> None:
    """tools/comm_check.py (the GPU check's NCCL probe) runs every comm helper on 2 real ranks and
    compares each result with what every rank can compute alone."""
    from tests.helpers.dist_launch import run_script_ranks

    # the ranks forked from the fork server, with torchrun's rendezvous variables: the tool, not the launch, is tested
    proc = run_script_ranks(REPO / "tools" / "comm_check.py", ["--timeout-s", "60"], timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    out = json.loads(line)
    assert out["ok"] and out["backend"] == "gloo" and out["world_size"] == 2 and out["comm_device"] == "cpu"
    assert out["checks"] == [
        "all_ranks_agree(True)", "all_ranks_agree(rank != 0)", "any_rank(rank == last)", "any_rank(False)",
        "stop_requested (no signal)", "stop_requested (signal on rank 0 only)", "all_reduce(cpu tensor)",
        "all_reduce(device tensor, max)", "broadcast_object", "decide_on_rank0", "all_gather_object",
        "all_gather(cpu tensor)", "gather_to_rank0(cpu tensor)", "check_identical_across_ranks", "barrier"]


@pytest.mark.parametrize("rank_exit", [1, 75])
def test_distill_sh_requeues_only_a_requested_stop(rank_exit, tmp_path) -> None:
    """slurm/distill.sh with stand-ins for srun / scontrol: a crash (exit 1, what a failing rank
    returns) ends the job with that code and no requeue; 75 (stopped on request) requeues. srun
    gets --wait, which kills the ranks left over once one has exited."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/bash\necho "$@" > {tmp_path}/srun.args\nexit {rank_exit}\n')
    (bin_dir / "scontrol").write_text(
        f'#!/bin/bash\nif [[ $1 == show ]]; then echo localhost; else echo "$@" >> {tmp_path}/scontrol.log; fi\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="123", SLURM_JOB_NAME="t",
               SLURM_JOB_NODELIST="localhost", SLURM_NTASKS="2", SIDSCALE_HOME=str(REPO),
               RUN_DIR=str(tmp_path / "run"), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "slurm" / "distill.sh"), "toy"], env=env, capture_output=True,
                          text=True, timeout=60)
    requeued = (tmp_path / "scontrol.log").read_text() if (tmp_path / "scontrol.log").exists() else ""
    assert "--wait=" in (tmp_path / "srun.args").read_text()
    if rank_exit == 75:
        assert proc.returncode == 0 and requeued == "requeue 123\n", proc.stdout + proc.stderr
    else:
        assert proc.returncode == 1 and requeued == "", proc.stdout + proc.stderr
        assert "the ranks failed (exit 1)" in proc.stderr
