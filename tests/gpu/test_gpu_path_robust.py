"""GPU-path review fixes that a CPU test can show in-process (issue 22's findings 2, 4 and 6-9).

- DeepSpeed's silent CPU fallback is refused unless DS_ACCELERATOR=cpu asked for it;
- hpZ (zero_hpz_partition_size > 1) is refused;
- a bare ``srun`` gets MASTER_ADDR / MASTER_PORT from SLURM's variables; the CUDA ordinal follows the
  visible devices;
- the VP schedule copies its table to a device once, not per call; the identical-teacher check
  reduces on the device and still finds one differing parameter;
- the ZeRO-3 EMA swap restores the partition on an error without any collective, and waits for its
  copies on CUDA;
- the frozen ZeRO-3 networks release what they still hold gathered after each generator backward;
- a rank's failed wait for rank 0's long work says what it waited for.
"""

from __future__ import annotations

import configparser
import datetime
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from sidscale.config import ConfigError, load_config
from sidscale.distributed import comm, runtime

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------- CPU fallback


def test_the_cpu_accelerator_is_refused_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(runtime.NoGPUError) as info:
        runtime.check_not_silently_on_cpu("cpu")
    msg = str(info.value)
    assert "CUDA 13.0" in msg and "driver >= 580" in msg and "CUDA_VISIBLE_DEVICES=''" in msg
    assert "DS_ACCELERATOR=cpu" in msg and torch.__version__ in msg
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    with pytest.raises(runtime.NoGPUError, match=r"CUDA 12\.4, which needs NVIDIA driver >= 525"):
        runtime.check_not_silently_on_cpu("cpu")
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(runtime.NoGPUError, match="CPU-only build"):
        runtime.check_not_silently_on_cpu("cpu")
    runtime.check_not_silently_on_cpu("cuda")  # a GPU: nothing to say
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    runtime.check_not_silently_on_cpu("cpu")  # asked for


class _CPUAccelerator:
    def device_name(self, index=None):
        return "cpu"


def test_init_distributed_stops_before_the_process_group_on_a_silent_fallback(monkeypatch) -> None:
    import deepspeed
    import deepspeed.accelerator

    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: _CPUAccelerator())
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    started = []
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: started.append(kw))
    with pytest.raises(runtime.StartupError, match="no usable GPU"):
        runtime.init_distributed()
    assert started == []


# ----------------------------------------------------------------------------------- hpZ


def test_hpz_is_refused(tmp_path: Path) -> None:
    from sidscale.distributed.ds_config import build_ds_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 8}}))
    cfg = load_config("toy", [f"deepspeed.config={path}"])
    with pytest.raises(ConfigError, match=r"zero_hpz_partition_size = 8 is not supported") as info:
        build_ds_config(cfg, 2)
    assert str(path) in str(info.value)
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 1}}))
    assert build_ds_config(cfg, 2)["zero_optimization"]["zero_hpz_partition_size"] == 1


# ----------------------------------------------------------------------------------- SLURM, devices


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-03],gpu7", ["node01", "node02", "node03", "gpu7"]),
    ("gpu7", ["gpu7"]),
    ("a[8-10,12]", ["a8", "a9", "a10", "a12"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("rack[1-2]-n[1-2],x", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2", "x"]),
])
def test_slurm_nodelist_expansion(nodelist: str, hosts: list[str]) -> None:
    assert runtime.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[01-03", "node[a-b]", "node01]"])
def test_slurm_nodelist_errors_name_the_list(bad: str) -> None:
    with pytest.raises(ValueError, match=r"SLURM node list"):
        runtime.expand_nodelist(bad)


def test_free_port_is_below_the_ephemeral_range_and_skips_ports_in_use(tmp_path) -> None:
    """A local rendezvous port is never one the kernel may give an outgoing connection (the range in
    /proc/sys/net/ipv4/ip_local_port_range): one drawn from it was taken by another job's connection
    before rank 0 listened, and rank 1 waited out its 180 s rendezvous timeout. A port in use is skipped."""
    import socket

    low = runtime.ephemeral_port_low()
    ports = {runtime.free_port() for _ in range(20)}
    assert all(max(1024, low - 16384) <= p < low for p in ports), (low, sorted(ports))
    assert len(ports) > 1  # drawn at random, not one fixed port every job would fight over
    # a range of two ports, one of them held by a listener: the other one, every time (a pair drawn where
    # free_port draws, below the ephemeral range: in it, other connections of the suite come and go)
    for _ in range(50):
        busy = runtime.free_port()
        with socket.socket() as other:
            try:
                other.bind(("127.0.0.1", busy - 1))
            except OSError:
                continue
        break
    assert {runtime.free_port(low=busy + 1, span=2) for _ in range(10)} <= {busy - 1, busy}
    with socket.socket() as held:
        held.bind(("127.0.0.1", busy))
        held.listen()
        assert {runtime.free_port(low=busy + 1, span=2) for _ in range(10)} == {busy - 1}
    rng = tmp_path / "range"
    rng.write_text("40000\t60999\n")
    assert runtime.ephemeral_port_low(str(rng)) == 40000
    rng.write_text("")
    assert runtime.ephemeral_port_low(str(rng)) == 32768  # unreadable: Linux's default


def _slurm_env(monkeypatch: pytest.MonkeyPatch, **extra: str) -> None:
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_NODELIST",
              "SLURM_NODELIST", "SLURM_JOBID"):
        # set, then delete: monkeypatch records a variable's absence only when it touched it first, and
        # _env_from_slurm writes RANK etc. itself (left behind, RANK=5 made later modules of the same
        # process think they were rank 5)
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    for k, v in dict(SLURM_PROCID="5", SLURM_LOCALID="1", SLURM_NTASKS="8", SLURM_JOB_ID="123456",
                     SLURM_JOB_NODELIST="node[01-03],gpu7", **extra).items():
        monkeypatch.setenv(k, v)


def test_bare_srun_gets_its_rendezvous_from_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    _slurm_env(monkeypatch)
    runtime._env_from_slurm()
    env = {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    # the first host; slurm/distill.sh's port formula, 20000 + job id % 20000
    assert env == dict(RANK="5", LOCAL_RANK="1", WORLD_SIZE="8", MASTER_ADDR="node01",
                       MASTER_PORT=str(20000 + 123456 % 20000))
    distill = (REPO / "slurm" / "distill.sh").read_text()
    assert "$(( 20000 + SLURM_JOB_ID % 20000 ))" in distill


def test_a_users_rendezvous_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    _slurm_env(monkeypatch, MASTER_ADDR="login3", MASTER_PORT="29500")
    runtime._env_from_slurm()
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("login3", "29500")


@pytest.mark.parametrize("local_rank, count, ordinal", [(0, 8, 0), (5, 8, 5), (5, 1, 0), (3, 2, 1), (2, 0, 2)])
def test_cuda_ordinal(local_rank: int, count: int, ordinal: int) -> None:
    assert runtime.cuda_ordinal(local_rank, count) == ordinal


class _FakeCUDA:
    def __init__(self, events: list):
        self.events = events

    def device_name(self, index=None):
        return "cuda" if index is None else f"cuda:{index}"

    def set_device(self, index):
        self.events.append(("set_device", index))


def test_one_gpu_per_task_binds_local_rank_to_device_0(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """``srun --gpus-per-task=1``: every task sees its own GPU as device 0; LOCAL_RANK 3 must not be used."""
    import deepspeed
    import deepspeed.accelerator

    for k, v in dict(RANK="3", LOCAL_RANK="3", WORLD_SIZE="4", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(k, v)
    events: list = []
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: _FakeCUDA(events))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: events.append("init"))
    caplog.set_level("INFO", logger="sidscale.distributed.runtime")
    info = runtime.init_distributed()
    assert events == [("set_device", 0), "init"]
    assert info.device == torch.device("cuda", 0)
    assert "LOCAL_RANK 3 sees 1 CUDA device(s): using device 0" in caplog.text


# ----------------------------------------------------------------------------------- requirements, distill.sh


def test_transformers_pin_has_the_dtype_keyword() -> None:
    """The SD3 / FLUX conditioners pass ``from_pretrained(dtype=...)``, which transformers reads from
    4.56 on; older versions ignore it and load T5-XXL in fp32 (19 GB per GPU)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    reqs = [Requirement(line) for line in cfg["options"]["install_requires"].split("\n") if line.strip()]
    (tf,) = [r for r in reqs if r.name == "transformers"]
    assert not tf.specifier.contains(Version("4.55.4")) and tf.specifier.contains(Version("4.56.0"))
    uses = [p for p in ("sidscale/families/flux/conditioning.py", "sidscale/families/sd3/conditioning.py")
            if "dtype=" in (REPO / p).read_text()]
    assert uses, "no conditioner passes dtype= any more: the pin may be relaxed"


def test_distill_sh_never_overrides_the_users_socket_interfaces() -> None:
    """A user's GLOO_SOCKET_IFNAME wins (the per-node automatic choice runs only when it is unset,
    tests/robustness/test_slurm_multinode.py runs it across nodes); NCCL's interface is never set by the script."""
    text = (REPO / "slurm" / "distill.sh").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "NCCL_SOCKET_IFNAME=" not in code.replace("NCCL_SOCKET_IFNAME=${", ""), "distill.sh sets NCCL_SOCKET_IFNAME"
    sets = [i for i, line in enumerate(code.splitlines()) if "export GLOO_SOCKET_IFNAME=" in line]
    assert sets, "distill.sh no longer chooses a gloo interface per node"
    lines = code.splitlines()
    for i in sets:
        indent = len(lines[i]) - len(lines[i].lstrip())
        guard = next(lines[j] for j in range(i - 1, -1, -1)  # the enclosing block's `if`
                     if lines[j].lstrip().startswith("if ") and len(lines[j]) - len(lines[j].lstrip()) < indent)
        assert "-z ${GLOO_SOCKET_IFNAME:-}" in guard, f"set without checking the user's value: {lines[i]}"
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        assert var in text.split("set -euo pipefail")[1], f"{var} is not documented where the ranks' env is set"


# ----------------------------------------------------------------------------------- VP schedule table


class _CrossDeviceCopies(TorchDispatchMode):
    """Counts copies between devices (what a host-to-device transfer is, on a real GPU)."""

    def __init__(self):
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst = args[0] if func is torch.ops.aten.copy_.default else out
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.device != dst.device:
                self.copies += 1
        return out


def test_vp_schedule_copies_its_table_to_a_device_once() -> None:
    """``meta`` stands in for the GPU: every call used to copy ``alphas_cumprod`` host-to-device."""
    from sidscale.core.schedule import VPSchedule

    sched = VPSchedule.from_settings()
    like = torch.empty(4, 4, 8, 8, device="meta")
    t = torch.zeros(4, dtype=torch.long, device="meta")
    with _CrossDeviceCopies() as probe:
        sched.coefficients(t, like)
    assert probe.copies == 1  # the first call on a device copies the table
    with _CrossDeviceCopies() as probe:
        for _ in range(5):
            sched.add_noise(like, like, t)
            sched.eps_to_x0(like, like, t)
    assert probe.copies == 0
    # the values are the table's (CPU: no copy at all), and a replaced table is copied again
    cpu_t = torch.tensor([0, 999])
    a, s = sched.coefficients(cpu_t, torch.zeros(2, 1))
    assert torch.equal(a.flatten(), sched.alphas_cumprod[cpu_t].sqrt())
    sched.alphas_cumprod = sched.alphas_cumprod * 0.5
    with _CrossDeviceCopies() as probe:
        sched.coefficients(t, like)
    assert probe.copies == 1


# ----------------------------------------------------------------------------------- teacher fingerprint


def _net(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3)).to(dtype)
    net.register_buffer("table", torch.arange(6, dtype=torch.float32))
    return net


@pytest.mark.parametrize("on_device", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fingerprint_finds_one_differing_parameter(on_device: bool, dtype: torch.dtype) -> None:
    from sidscale.distributed.engines import module_fingerprint

    base = module_fingerprint(_net(dtype), on_device)
    assert module_fingerprint(_net(dtype), on_device) == base
    changed = []
    for i, (name, _) in enumerate(list(_net(dtype).named_parameters()) + [("table", None)]):
        net = _net(dtype)
        with torch.no_grad():
            t = net.get_buffer(name) if name == "table" else net.get_parameter(name)
            flat = t.view(-1).view(torch.int16 if dtype == torch.bfloat16 else torch.int32)
            flat[i % flat.numel()] ^= 1  # the lowest mantissa bit of one element
        changed.append(module_fingerprint(net, on_device))
    assert base not in changed and len(set(changed)) == len(changed)
    # two elements exchanged (the same multiset of values: a plain sum cannot see it)
    net = _net(dtype)
    with torch.no_grad():
        w = net[0].weight.view(-1)
        w[[3, 17]] = w[[17, 3]].clone()
    assert module_fingerprint(net, on_device) != base


def test_tensor_digest_is_exact_whatever_the_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    from sidscale.distributed import engines

    x = torch.randn(1001, 3).bfloat16()
    whole = engines.tensor_digest(x)
    monkeypatch.setattr(engines, "_DIGEST_CHUNK", 7)
    assert torch.equal(engines.tensor_digest(x), whole)
    # an independent computation of the second sum (Python integers, mod 2^64)
    words = torch.cat([x.view(-1).view(torch.uint8), torch.zeros(2, dtype=torch.uint8)]).view(torch.int32).tolist()
    a, b = engines._MULT_A % 2**64, engines._MULT_B % 2**64
    expect = sum(w * ((i * a + b) % 2**64 | 1) for i, w in enumerate(words)) % 2**64
    assert int(whole[1]) % 2**64 == expect


# ----------------------------------------------------------------------------------- EMA swap


class _Persistent:
    def __init__(self):
        self.gathers = 0

    def all_gather(self, params):
        self.gathers += 1


def _fake_zero3(flat: torch.Tensor, ema_shard: torch.Tensor):
    persistent = _Persistent()
    engine = SimpleNamespace(optimizer=SimpleNamespace(fp16_partitioned_groups_flat=[flat],
                                                       persistent_parameters=[persistent]),
                             empty_partition_cache=lambda: None, module=torch.nn.Linear(1, 1))
    return engine, SimpleNamespace(shards=[ema_shard]), persistent


def test_ema_swap_restores_the_partition_without_a_collective_on_an_error() -> None:
    from sidscale.distributed.sharded_ema import ema_swapped_into

    flat, shard = torch.arange(6.0), torch.full((6,), -1.0)
    engine, ema, persistent = _fake_zero3(flat, shard)
    with pytest.raises(torch.OutOfMemoryError), ema_swapped_into(engine, ema):
        assert torch.equal(flat, shard)
        raise torch.OutOfMemoryError("preview on one rank")
    assert torch.equal(flat, torch.arange(6.0)) and engine.module.training
    assert persistent.gathers == 0  # a collective here would wait for ranks that are not coming
    with ema_swapped_into(engine, ema):
        pass
    assert torch.equal(flat, torch.arange(6.0)) and persistent.gathers == 1  # the normal exit re-gathers


def test_ema_swap_waits_for_its_copies_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    from sidscale.distributed import sharded_ema

    synced = []
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device=None: SimpleNamespace(synchronize=lambda: synced.append(device)))
    sharded_ema._copies_done([SimpleNamespace(device=torch.device("cuda", 2))])
    assert synced == [torch.device("cuda", 2)]
    sharded_ema._copies_done([torch.zeros(2)])  # CPU: nothing to wait for
    assert len(synced) == 1
    # the swap waits after each of its two copy loops (what the partitions hold at each wait)
    seen = []
    monkeypatch.setattr(sharded_ema, "_copies_done", lambda flats: seen.append(flats[0].clone()))
    flat, shard = torch.arange(6.0), torch.full((6,), -1.0)
    engine, ema, _ = _fake_zero3(flat, shard)
    with sharded_ema.ema_swapped_into(engine, ema):
        assert len(seen) == 1 and torch.equal(seen[0], shard)
    assert len(seen) == 2 and torch.equal(seen[1], torch.arange(6.0))


# ----------------------------------------------------------------------------------- long-work waits


def test_a_failed_wait_for_rank0_says_what_it_waited_for(capsys: pytest.CaptureFixture) -> None:
    err = comm.LongWorkWaitError("rank 1 waited 86400 s (limit 86400 s) for rank 0 to finish the toy evaluation: "
                                 "rank 0 ran past the limit (DistBackendError: timed out)")
    with pytest.raises(SystemExit):
        runtime.fail_fast(err, 1)
    text = capsys.readouterr().err
    assert "for rank 0 to finish the toy evaluation: rank 0 ran past the limit" in text.splitlines()[-1]
    assert "another rank probably failed first" not in text
    with pytest.raises(SystemExit):
        runtime.fail_fast(RuntimeError("Connection closed by peer"), 1)
    assert "another rank probably failed first" in capsys.readouterr().err


def test_long_work_group_is_made_once_per_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    made = []
    world = object()
    monkeypatch.setattr(comm, "_world", lambda: world)
    monkeypatch.setattr(comm, "_long_work_groups", {})
    monkeypatch.setattr(dist, "new_group", lambda backend, timeout: made.append((backend, timeout)) or len(made))
    assert comm.long_work_group(30) == comm.long_work_group(30) == 1
    assert made == [("gloo", datetime.timedelta(seconds=30))]
    monkeypatch.setattr(comm, "_world", lambda: object())  # a new process group: a new wait group
    assert comm.long_work_group(30) == 2


# ----------------------------------------------------------------------------------- ZeRO-3 leftovers


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["teacher.grad_checkpointing=true", "generator.grad_checkpointing=true",
                                        "fake.grad_checkpointing=true"]], ids=["plain", "checkpointing"])
def test_frozen_zero3_networks_release_their_leftovers_after_each_generator_backward(tmp_path, tiny_toy_teacher,
                                                                                     monkeypatch, extra) -> None:
    """ZeRO-3 generator and fake net, partitioned teacher, 2 micro-batches: after each generator
    backward the fake net's and the teacher's coordinators are drained (DeepSpeed itself drains only
    the generator's), and afterwards none of their parameters is left gathered."""
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from tests.helpers.inprocess import one_rank_trainer

    calls: list[tuple[int, int]] = []  # (which coordinator owner, parameters still gathered before the call)
    real = DeepSpeedZeRoOffload.release_backward_leftovers

    def spy(self):
        gathered = sum(p.ds_status != ZeroParamStatus.NOT_AVAILABLE and not p.ds_persist
                       for p in self.module.parameters())
        calls.append((id(self), gathered))
        return real(self)

    monkeypatch.setattr(DeepSpeedZeRoOffload, "release_backward_leftovers", spy)
    overrides = [f"teacher.path={tiny_toy_teacher}", "train.precision=fp32", "teacher.dtype=fp32",
                 "train.global_batch=4", "train.micro_batch=2", "teacher.resolution=8", "data.shards=indexed:toy",
                 "eval.num_samples=0", "deepspeed.config=ds_configs/zero3.json", "teacher.partitioned=true",
                 *extra]
    with one_rank_trainer(tmp_path / "run", overrides) as trainer:
        teacher, fake = trainer.teacher_engine.optimizer, trainer.fake_engine.optimizer.parameter_offload
        assert trainer.gas == 2
        trainer.train_step()
        for owner in (teacher, fake):
            left = [p for p in owner.module.parameters()
                    if p.ds_status != ZeroParamStatus.NOT_AVAILABLE and not p.ds_persist]
            assert not left, f"{len(left)} parameters left gathered"
    # the teacher never runs a backward of its own: every call is the trainer's, one per micro-batch
    assert [c for c in calls if c[0] == id(teacher)] and len([c for c in calls if c[0] == id(teacher)]) == 2
    # the fake net: 2 from its own backward (DeepSpeed), 2 from the generator's (the trainer)
    assert len([c for c in calls if c[0] == id(fake)]) == 4
    print("parameters found gathered at each release:", [g for _, g in calls])


# ----------------------------------------------------------------------------------- fault injection


def test_fault_injection_slow_and_several_faults(monkeypatch: pytest.MonkeyPatch) -> None:
    from sidscale.testing import fault_injection as fi

    slept = []
    monkeypatch.setattr(fi.time, "sleep", slept.append)
    spec = "point=export,step=4,rank=0,action=slow,seconds=12.5; point=load_teacher,step=0,rank=1,action=config_error"
    monkeypatch.setenv(fi.ENV, spec)
    assert [f.spec() for f in fi.active()] == [s.strip() for s in spec.split(";")]
    fi.maybe_fail("export", 4, 1)  # another rank
    fi.maybe_fail("export", 3, 0)  # another step
    assert slept == []
    fi.maybe_fail("export", 4, 0)
    assert slept == [12.5]
    with pytest.raises(ConfigError, match=r"injected input error \(point=load_teacher,step=0,rank=1"):
        fi.maybe_fail("load_teacher", 0, 1)
    for bad in ("point=export,step=1,action=slow", "point=export,step=1,action=raise,seconds=3"):
        with pytest.raises(ValueError, match="seconds"):
            fi.parse(bad)
