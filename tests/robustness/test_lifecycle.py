"""The job's life cycle (issue 26, items 8-16, found by an outside fault campaign): restored files
recover a run, damaged step directories are moved aside before a re-save, every reader of a
checkpoint verifies it, universal copies are checksummed and bound to their source, a changed
learning rate is applied on resume, the run lock survives a deleted ``.lock``. In-process and cheap:
synthetic checkpoints (real files, real checksums) wherever the trainer's engines are not needed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from sidscale import train
from sidscale.checkpointing import files as ckpt_lib
from sidscale.checkpointing.manager import Checkpointer
from sidscale.checkpointing.states import CounterState, DataState, EMAState, EngineState, RNGState
from sidscale.errors import RunDirError


def synthetic_checkpoint(run_dir: Path, step: int, world: int = 1, payload: bytes = b"weights",
                         extra: dict | None = None) -> Path:
    """A complete checkpoint as the trainer leaves it: engine shards, rank files, a meta.json that
    records every file's checksum (and its own CRC)."""
    path = ckpt_lib.step_dir(run_dir, step)
    for tag in ckpt_lib.ENGINE_TAGS:
        (path / tag).mkdir(parents=True)
        for r in range(world):
            (path / tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(payload + bytes([r, step]) * 64)
    for r in range(world):
        torch.save({"step": step, "rank": r}, ckpt_lib.rank_file(path, r))
    files = {}
    for r in range(world):
        files.update(ckpt_lib.own_checksums(path, r, world))
    ckpt_lib.write_meta(path, {"step": step, "images_seen": 8 * step, "world_size": world, "zero_stage": 2,
                               "files": files, **(extra or {})})
    ckpt_lib.mark_latest(run_dir, path)
    assert ckpt_lib.is_complete(path)
    return path


def flip_byte(path: Path, at: int = 10) -> bytes:
    data = bytearray(path.read_bytes())
    good = bytes(data)
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    return good


# ------------------------------------------------------------------ 8: restored files recover the run
def test_a_run_whose_checkpoints_are_all_damaged_is_never_started_over(tmp_path):
    run = tmp_path / "run"
    ckpts = [synthetic_checkpoint(run, s) for s in (2, 4)]
    victims = [ckpt_lib.rank_file(c, 0) for c in ckpts]
    good = [flip_byte(v) for v in victims]
    for c in ckpts:  # what choose_resume_checkpoint does when every rank finds the damage
        problems = ckpt_lib.verify_share(c, 0, 1)
        assert problems and str(ckpt_lib.rank_file(c, 0)) in problems[0]
        ckpt_lib.set_aside_damaged(c, problems)
    with pytest.raises(RunDirError) as e:
        train.prepare_run_dir(run, resume=True)
    assert str(run) in str(e.value) and "step_00000002, step_00000004" in str(e.value)
    assert "Restore their files" in str(e.value) and "move" in str(e.value)
    # the user restores step 4's good bytes (step 2 stays damaged): the next start resumes from step 4
    victims[1].write_bytes(good[1])
    assert train.prepare_run_dir(run, resume=True) is True
    assert ckpt_lib.find_resume_checkpoint(run) == ckpts[1]
    assert ckpt_lib.verify_share(ckpts[1], 0, 1) == []
    record = json.loads((ckpts[1] / ckpt_lib.RESTORED_META).read_text())["damaged"]
    assert str(victims[1]) in record[0]  # the damage record is kept
    assert (ckpts[0] / ckpt_lib.DAMAGED_META).is_file() and not (ckpts[0] / ckpt_lib.META).exists()


def test_a_partial_first_save_is_not_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    (ckpt_lib.step_dir(run, 2) / "generator").mkdir(parents=True)  # killed during the very first save
    assert train.prepare_run_dir(run, resume=True) is False


# ------------------------------------------------------------------ 9: a file replaced by a directory
class _Engine:
    """Writes a shard where DeepSpeed would (save_checkpoint creates the step directory)."""

    def save_checkpoint(self, save_dir, tag, **kw):
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"new shard")


def _saving_stub(run: Path, step: int) -> Checkpointer:
    """The toy run's checkpointer over stub engines, EMA and data source (the run's real RNG state)."""
    from types import SimpleNamespace

    from sidscale.config import config_to_dict, load_config

    cfg = load_config("toy", [])
    counters = SimpleNamespace(step=step, images_seen=8 * step)
    return Checkpointer(
        run, rank=0, world=1, is_main=True,
        engines={"generator": EngineState(_Engine(), 0.0, "generator.lr"),
                 "fake": EngineState(_Engine(), 0.0, "fake.lr")},
        states={"ema": EMAState(SimpleNamespace(state_dict=lambda: {}, names=[], params=[])),
                "rng": RNGState(torch.device("cpu")), "data": DataState(SimpleNamespace(state_dict=lambda: {})),
                "trainer": CounterState(counters, extra_meta=dict)},
        run_meta=lambda: {"world_size": 1, "zero_stage": 2, "config": config_to_dict(cfg)},
        keep_last=cfg.train.keep_last, step=lambda: counters.step)


def test_a_damaged_step_directory_is_moved_aside_before_the_resave(tmp_path):
    run = tmp_path / "run"
    synthetic_checkpoint(run, 2)
    ckpt = synthetic_checkpoint(run, 4)
    victim = ckpt_lib.rank_file(ckpt, 0)
    victim.unlink()
    victim.mkdir()  # a file of the checkpoint replaced by a directory
    (victim / "x").write_text("x")
    problems = ckpt_lib.verify_share(ckpt, 0, 1)
    assert problems == [f"{victim}: missing"]
    ckpt_lib.set_aside_damaged(ckpt, problems)  # the fallback to step 2 happened; training redoes step 4
    _saving_stub(run, 4)._save(ckpt)  # raised IsADirectoryError on every retry
    assert ckpt_lib.is_complete(ckpt) and ckpt_lib.verify_share(ckpt, 0, 1) == []
    aside = ckpt.with_name("step_00000004.damaged")
    assert (aside / ckpt_lib.DAMAGED_META).is_file() and (aside / victim.name / "x").is_file()
    # a second damaged re-save of the same step keeps both records
    ckpt_lib.rank_file(ckpt, 0).unlink()
    _saving_stub(run, 4)._save(ckpt)
    assert ckpt.with_name("step_00000004.damaged.1").is_dir() and ckpt_lib.is_complete(ckpt)
    # a complete one is only invalidated (re-written in place), a never-completed one removed
    assert ckpt_lib.prepare_save_dir(ckpt_lib.step_dir(run, 2)) is None
    assert not (ckpt_lib.step_dir(run, 2) / ckpt_lib.META).exists() and ckpt_lib.step_dir(run, 2).is_dir()
    partial = ckpt_lib.step_dir(run, 6)
    (partial / "generator").mkdir(parents=True)
    assert ckpt_lib.prepare_save_dir(partial) is None and not partial.exists()
    # the set-aside directories go with the checkpoints older than the ones kept
    synthetic_checkpoint(run, 8)
    ckpt_lib.prune_checkpoints(run, keep_last=1)
    assert sorted(p.name for p in ckpt_lib.checkpoints_root(run).glob("step_*")) == ["step_00000008"]


# ------------------------------------------------------------------ 16: an edited meta.json
@pytest.mark.parametrize("key,value", [("world_size", 1), ("zero_stage", 3)])
def test_an_edited_meta_json_falls_back_to_the_previous_checkpoint(tmp_path, key, value):
    """Before: the edited checkpoint was complete, and every retry failed loading it (or was refused)."""
    run = tmp_path / "run"
    older = synthetic_checkpoint(run, 2, world=2)
    newest = synthetic_checkpoint(run, 4, world=2)
    meta = json.loads((newest / ckpt_lib.META).read_text())
    meta[key] = value
    (newest / ckpt_lib.META).write_text(json.dumps(meta))
    assert not ckpt_lib.is_complete(newest)
    assert ckpt_lib.resume_candidates(run) == [older]


# ------------------------------------------------------------------ 10, 16: export
def test_export_verifies_the_rank_files_it_reads(tiny_toy_teacher, tmp_path, capsys):
    import importlib.util

    tool_path = Path(train.__file__).parent.parent / "tools" / "export.py"
    spec = importlib.util.spec_from_file_location("export_tool", tool_path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    sampling = {"teacher_kind": "toy", "teacher_path": str(tiny_toy_teacher)}
    ckpt = synthetic_checkpoint(tmp_path / "run", 2, extra={"sampling": sampling})
    victim = ckpt_lib.rank_file(ckpt, 0)
    flip_byte(victim, at=40)
    assert tool.main([str(ckpt), "--out", str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err
    assert f"{victim}: checksum of bytes 0..{ckpt_lib.CHUNK}" in err and "corrupted" in err
    assert not (tmp_path / "export").exists()
    with pytest.raises(ckpt_lib.CheckpointError, match="rank_00000.pt"):  # the evaluation's reader too
        ckpt_lib.full_ema_from_checkpoint(ckpt)


def test_an_export_killed_before_its_rename_leaves_nothing_behind(tiny_toy_teacher, tmp_path):
    from diffusers import UNet2DConditionModel

    from sidscale.export import export_generator

    gen = UNet2DConditionModel.from_pretrained(tiny_toy_teacher / "unet")
    leftover = tmp_path / ".export.k1ll3d"  # the temporary directory of a killed export of tmp_path/export
    (leftover / "unet").mkdir(parents=True)
    (leftover / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
    unrelated = tmp_path / ".exports_of_someone_else"
    unrelated.mkdir()
    out = export_generator(gen.state_dict(), dict(gen.config), tmp_path / "export",
                           {"teacher_kind": "toy", "teacher_path": str(tiny_toy_teacher)})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".exports_of_someone_else", "export"]
    assert (out / "unet" / "config.json").is_file()


# ------------------------------------------------------------------ 11, 12, 16: universal copies
@pytest.fixture
def fake_converter(monkeypatch):
    """DeepSpeed's ds_to_universal replaced by a writer of one file per engine whose bytes are those of
    the source shards (what matters here is what convert_to_universal does around it); ``calls`` counts
    conversions, ``fail_after_bytes`` makes a write fail as torch.save does on a full disk."""
    import deepspeed.checkpoint.ds_to_universal as converter

    state = {"calls": 0, "fail": None}

    def main(args):
        state["calls"] += Path(args.input_folder).name == "generator"  # one per conversion
        src = b"".join(p.read_bytes() for p in sorted(Path(args.input_folder).iterdir()))
        out = Path(args.output_folder) / "zero" / "net.weight"
        out.mkdir(parents=True)
        (out / "fp32.pt").write_bytes(src)
        if state["fail"]:
            (out / "exp_avg.pt").write_bytes(b"x" * 4096)
            raise state["fail"]
        (Path(args.output_folder) / "latest_universal").write_text("x")

    monkeypatch.setattr(converter, "main", main)
    return state


def test_universal_copies_are_verified_bound_to_their_source_and_pruned(fake_converter, tmp_path):
    from sidscale.checkpointing import elastic

    run = tmp_path / "run"
    ckpt = synthetic_checkpoint(run, 4, world=2)
    out = elastic.convert_to_universal(ckpt)
    assert fake_converter["calls"] == 1 and out == elastic.universal_dir(ckpt, 2)
    assert elastic.convert_to_universal(ckpt) == out and fake_converter["calls"] == 1  # reused: it verifies
    copy = out / "generator" / "zero" / "net.weight" / "fp32.pt"
    flip_byte(copy)  # a flipped byte in a copy left by a killed job: rebuilt, not loaded
    elastic.convert_to_universal(ckpt)
    assert fake_converter["calls"] == 2 and elastic.usable_copy(out, elastic.source_identity(ckpt)) is None
    copy.write_bytes(copy.read_bytes()[:10])  # truncated: rebuilt
    elastic.convert_to_universal(ckpt)
    assert fake_converter["calls"] == 3
    # a rollback, then training to the same step again: same name, another checkpoint -> a stale copy
    shutil_rmtree(ckpt)
    ckpt = synthetic_checkpoint(run, 4, world=2, payload=b"retrained")
    elastic.convert_to_universal(ckpt)
    assert fake_converter["calls"] == 4
    assert copy.read_bytes() == b"".join(p.read_bytes() for p in sorted((ckpt / "generator").iterdir()))
    # a copy of an older checkpoint and a partial one are pruned by the next conversion
    stale = elastic.universal_dir(ckpt_lib.step_dir(run, 2), 2)
    (stale.with_name(stale.name + ".tmp") / "fake").mkdir(parents=True)
    (stale / "generator").mkdir(parents=True)
    elastic.convert_to_universal(ckpt)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
    # the job continues on the rank count that wrote the checkpoint: the copy goes
    assert elastic.writer_count(ckpt, 3) == 2 and out.is_dir()
    assert elastic.writer_count(ckpt, 2) == 2 and not out.parent.exists()


def shutil_rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


def test_a_full_disk_during_the_conversion_names_the_directory_and_removes_the_partial_copy(
        fake_converter, tmp_path):
    from sidscale.checkpointing import elastic

    ckpt = synthetic_checkpoint(tmp_path / "run", 4, world=2)
    fake_converter["fail"] = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4160 vs 4096")
    with pytest.raises(elastic.UniversalConversionError) as e:
        elastic.convert_to_universal(ckpt)
    where = ckpt_lib.checkpoints_root(tmp_path / "run") / elastic.UNIVERSAL
    needed = sum(f.stat().st_size for tag in ckpt_lib.ENGINE_TAGS for f in (ckpt / tag).iterdir())
    msg = str(e.value)
    assert f"the disk holding {where} is full" in msg and f"needs about {needed / 2**20:.0f} MiB in {where}" in msg
    assert list(where.iterdir()) == []  # the partial .tmp copy is gone


# ------------------------------------------------------------------ 13: a changed learning rate on resume
def test_a_changed_learning_rate_is_applied_on_resume(tiny_toy_teacher, tmp_path, caplog):
    """DeepSpeed's load_checkpoint restores the optimizer's lr from the checkpoint; the run's
    config.yaml / meta.json record the new one. The resumed Adam must step with the new one: its
    first update from the same state is exactly the old run's scaled by new/old lr (Adam's step is
    linear in lr for a given state and gradient)."""
    from tests.helpers.inprocess import one_rank_trainer

    base = [f"teacher.path={tiny_toy_teacher}", "train.precision=fp32", "teacher.dtype=fp32",
            "teacher.resolution=8", "train.global_batch=2", "train.micro_batch=2", "data.shards=indexed:toy",
            "eval.num_samples=0", "train.seed=3", "fake.lr=1e-2"]
    run = tmp_path / "run"

    def step_delta(trainer) -> dict[str, torch.Tensor]:
        before = {k: v.detach().clone() for k, v in trainer.fake_engine.module.state_dict().items()}
        trainer.train_step()
        return {k: trainer.fake_engine.module.state_dict()[k] - v for k, v in before.items()}

    with one_rank_trainer(run, base + ["generator.lr=1e-2"]) as trainer:
        trainer.train_step()
        path = trainer.save_checkpoint()
        old = step_delta(trainer)
    with one_rank_trainer(tmp_path / "resumed", base + ["fake.lr=3e-3", "generator.lr=2e-3"]) as resumed:
        resumed.resume(path)
        for engine, lr in ((resumed.gen_engine, 2e-3), (resumed.fake_engine, 3e-3)):
            inner = engine.optimizer.optimizer  # the torch Adam inside the ZeRO optimizer
            assert [g["lr"] for g in inner.param_groups] == [lr] * len(inner.param_groups)
        new = step_delta(resumed)
    assert "fake.lr: the checkpoint's optimizer had lr [0.01], this job sets 0.003" in caplog.text
    moved = [k for k in old if old[k].abs().max() > 0]
    assert moved
    for k in moved:
        torch.testing.assert_close(new[k], old[k] * 0.3, rtol=1e-4, atol=1e-7)  # atol: the ulp of the weights


# ------------------------------------------------------------------ 16: the run lock
def test_the_run_lock_survives_a_deleted_lock_file_and_refuses_a_directory(tmp_path):
    from sidscale.run_lock import LOCK_NAME, RunDirLockedError, RunLock

    run = tmp_path / "run"
    run.mkdir()
    first = RunLock(run).acquire()
    try:
        (run / LOCK_NAME).unlink()  # by hand, while the job runs
        with pytest.raises(RunDirLockedError, match="deleted or replaced"):
            RunLock(run).acquire()
    finally:
        first.release()
    RunLock(run).acquire().release()  # released with the holder: a requeue may start
    (run / LOCK_NAME).unlink()
    (run / LOCK_NAME).mkdir()
    with pytest.raises(RunDirLockedError, match=r"\.lock is not a regular file .* remove it"):
        RunLock(run).acquire()
    (run / LOCK_NAME).rmdir()  # the refused acquire left no lock behind
    RunLock(run).acquire().release()


# ------------------------------------------------------------------ 16: malformed manifests, all-bad shards
def _prompt_shards(tmp_path: Path) -> tuple[Path, dict]:
    from sidscale.data.shards import write_prompt_shards

    shards = tmp_path / "shards"
    return shards / "manifest.json", write_prompt_shards(["a red circle", "a blue square"] * 4, shards, shard_size=4)


@pytest.mark.parametrize("case", ["list", "no_shards", "empty_shards"])
def test_a_malformed_manifest_is_one_clear_error(case, tmp_path):
    from sidscale.config import ConfigError
    from sidscale.data.prompts import StreamPromptSource

    manifest, data = _prompt_shards(tmp_path)
    manifest.write_text({"list": "[]", "no_shards": json.dumps({k: v for k, v in data.items() if k != "shards"}),
                         "empty_shards": json.dumps({**data, "shards": []})}[case])
    with pytest.raises(ConfigError) as e:  # main() prints a ConfigError once, no traceback on any rank
        StreamPromptSource(str(manifest), rank=0, world_size=1, batch_size=2, seed=0, num_workers=0,
                           shuffle_buffer=0, resampled=False, tokenize=None)
    problem = "holds a JSON list, not an object" if case == "list" else "its 'shards' list is missing or empty"
    assert f"{manifest} is not a usable prompt shard manifest ({problem})" in str(e.value)


def test_all_bad_shards_are_one_clear_error_before_the_run_starts(tiny_toy_teacher, tmp_path):
    from tests.helpers.inprocess import run_main

    manifest, data = _prompt_shards(tmp_path)
    for s in data["shards"]:
        (manifest.parent / s["path"]).write_bytes(b"\x00junk" * 100)
    run = tmp_path / "run"
    proc = run_main(run, [f"teacher.path={tiny_toy_teacher}", "teacher.resolution=8", f"data.shards={manifest}",
                          "train.max_steps=1", "train.global_batch=2", "train.micro_batch=2", "data.num_workers=1",
                          "eval.num_samples=0"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("none of its 2 shards holds a readable prompt") == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # no config.yaml, no tb/: a retry may start fresh


# ------------------------------------------------------------------ 16: a truncated text-encoder file
def test_a_truncated_text_encoder_file_is_named(tiny_toy_teacher, tmp_path):
    import shutil

    from sidscale.config import ConfigError
    from sidscale.families.shared.clip import load_conditioner

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_toy_teacher, teacher)
    weights = teacher / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ConfigError) as e:  # was: "SafetensorError: Error while deserializing header" alone
        load_conditioner(teacher, "toy")
    assert f"damaged weight file(s) {weights} ({weights.stat().st_size} bytes" in str(e.value)
    assert load_conditioner(tiny_toy_teacher, "toy") is not None  # intact files load as before


# ------------------------------------------------------------------ 15: elastic replay of webdataset prompts
@pytest.mark.parametrize("n_shards,batches", [(11, 120), (11, 7), (12, 120)])
def test_the_elastic_prompt_replay_is_what_the_readme_states(tmp_path, n_shards, batches):
    """2 ranks (1 worker each) read equal shards in epoch mode in lockstep, then the job continues
    on 1 rank. The replay counted from the batches (samples of epoch >= the restart epoch) equals
    C - E*N, lies within rho + E*(rho - 1) epochs, and exceeds one epoch for uneven splits (the old
    README said "at most one epoch's worth"); the new rank reads all of them again."""
    from fractions import Fraction

    from sidscale.checkpointing import elastic
    from sidscale.data.shards import write_prompt_shards
    from sidscale.data.stream import PromptStream

    per_shard = 4
    write_prompt_shards([f"prompt {i}" for i in range(n_shards * per_shard)], tmp_path / "s", shard_size=per_shard)
    pattern = str(tmp_path / "s" / "manifest.json")

    def stream(rank: int, world: int) -> PromptStream:
        return PromptStream(pattern, rank=rank, world_size=world, batch_size=2, seed=1, num_workers=0,
                            shuffle_buffer=0, resampled=False)

    old = [stream(r, 2) for r in range(2)]
    read = [(p, e) for _ in range(batches) for s in old for b in [next(s)]
            for p, e in zip(b["prompts"], b["epoch"], strict=True)]
    states = [s.state_dict() for s in old]
    restart = min(c["epoch"] for s in states for c in s["workers"])
    replay = [p for p, e in read if e >= restart]  # counted from what was read
    n = n_shards * per_shard
    assert elastic.replayed_samples(states, n) == len(replay)
    b = -(-n_shards // 2) * per_shard  # the larger worker-epoch: ceil(shards / workers) shards
    assert len(replay) <= 2 * (restart + 1) * b - restart * n  # K(E+1)b - EN samples
    rho = Fraction(b, n // 2)
    assert Fraction(len(replay), n) <= rho + restart * (rho - 1)  # the same, in epochs
    if n_shards == 11 and batches == 120:
        assert restart == 9 and len(replay) / n > 1.9  # more than one epoch: the old statement was false
    if n_shards == 12:
        assert len(replay) <= n  # even split: at most one epoch
    new = stream(0, 1)
    new.load_state_dict(elastic.merged_stream_state(states, 0))
    again = [p for _ in range(n // 2) for p in next(new)["prompts"]]  # epoch `restart`, whole, on one rank
    assert set(replay) <= set(again) and len(set(again)) == n


# ------------------------------------------------------------------ 14: start-up
def test_a_rank_missing_at_start_up_ends_the_others_after_the_rendezvous_timeout(tmp_path):
    """Rank 0 of 2 whose peer died during its imports: it ends with a message after
    SIDSCALE_RENDEZVOUS_TIMEOUT_S (3 s here), not after dist.timeout_s (600 s). The subprocess's own
    limit only guards against a hang."""
    import subprocess
    import sys

    from sidscale.distributed.runtime import free_port

    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), SIDSCALE_RENDEZVOUS_TIMEOUT_S="3", DS_ACCELERATOR="cpu")
    code = ("from sidscale.distributed.runtime import init_distributed\n"
            "init_distributed(timeout_s=600)\nprint('started')\n")
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("rank 0 still waited for its dead peer after 120 s (dist.timeout_s is 600)")
    assert proc.returncode != 0 and "started" not in proc.stdout
    assert "RendezvousError: rank 0 of 2: the process group start-up at 127.0.0.1:" in proc.stderr, proc.stderr[-3000:]
    assert "did not complete within 3 s (SIDSCALE_RENDEZVOUS_TIMEOUT_S)" in proc.stderr


def test_after_the_rendezvous_the_group_has_the_configured_timeout(monkeypatch):
    import datetime

    import torch.distributed as dist

    from sidscale.distributed.rendezvous import RendezvousError, rendezvous_timeout_s
    from tests.helpers.inprocess import one_rank_group

    monkeypatch.setenv("SIDSCALE_RENDEZVOUS_TIMEOUT_S", "7")
    assert rendezvous_timeout_s(600) == 7 and rendezvous_timeout_s(5) == 5
    with one_rank_group():
        c10d = dist.distributed_c10d
        assert c10d._get_default_store().timeout == datetime.timedelta(seconds=600)  # dist.timeout_s default
        assert c10d._get_default_group()._get_backend(torch.device("cpu")).options._timeout == \
            datetime.timedelta(seconds=600)
    monkeypatch.setenv("SIDSCALE_RENDEZVOUS_TIMEOUT_S", "soon")
    with pytest.raises(RendezvousError, match="SIDSCALE_RENDEZVOUS_TIMEOUT_S='soon'"):
        rendezvous_timeout_s(600)


@pytest.fixture(scope="module")
def script_start(tmp_path_factory) -> str:
    """``python sidscale/train.py --help`` in a fresh interpreter (train.py run as ``__main__``, as a
    launcher starts it), with a SIGUSR1 sent at the moment it imports numpy (its first heavy import) and
    every garbage collection recorded: the driver's output, shared by the two tests below."""
    import subprocess
    import sys

    driver = tmp_path_factory.mktemp("start") / "driver.py"
    driver.write_text(f"""
import gc, os, runpy, signal, sys

collections = []  # (generation, objects frozen at the time) of each collection inside train.py
inside = False

def record(phase, info):
    if phase == "start" and inside:
        collections.append((info["generation"], gc.get_freeze_count()))

class SignalOnNumpy:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy":
            sys.meta_path.remove(self)
            print("collector on while importing", gc.isenabled())
            os.kill(os.getpid(), signal.SIGUSR1)
        return None

gc.callbacks.append(record)
sys.meta_path.insert(0, SignalOnNumpy())
sys.argv = ["sidscale/train.py", "--help"]
inside = True
try:
    runpy.run_path({str(Path(train.__file__))!r}, run_name="__main__")
except SystemExit as e:
    print("train.py exited", e.code)
inside = False
print("collector on after", gc.isenabled(), "frozen", gc.get_freeze_count())
print("full collections of an unfrozen heap", sum(1 for g, frozen in collections if g == 2 and frozen == 0))
from sidscale.distributed.preemption import StopSignal
stop = StopSignal()
print("received", stop.received, "stop", stop.stop_requested())
""")
    proc = subprocess.run([sys.executable, str(driver)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"rc {proc.returncode}: {proc.stderr[-2000:]}"
    assert "train.py exited 0" in proc.stdout
    return proc.stdout


def test_a_stop_signal_during_the_imports_is_kept_not_fatal(script_start):
    """SIGUSR1 while train.py is still importing used to kill the rank (the default action). Now it is
    recorded, and the trainer's StopSignal takes it over: the job stops after its first step like for
    any stop request."""
    import signal

    assert f"received [{int(signal.SIGUSR1)}] stop True" in script_start, script_start[-2000:]


def test_start_up_imports_run_without_full_collections_and_end_frozen(script_start):
    """train.py's module imports run with the garbage collector off (no full collection walks the
    growing import heap), then the imported heap is frozen out of later scans and the collector is back
    on for the run."""
    import re

    assert "collector on while importing False" in script_start, script_start[-2000:]
    assert "full collections of an unfrozen heap 0" in script_start, script_start[-2000:]
    after = re.search(r"collector on after (\w+) frozen (\d+)", script_start)
    assert after and after.group(1) == "True", script_start[-2000:]
    assert int(after.group(2)) > 100_000, script_start[-2000:]  # torch, DeepSpeed, ...: ~1M objects


def test_a_stop_signal_in_the_per_rank_shell_of_distill_sh_reaches_the_trainer(tmp_path):
    """slurm/distill.sh's per-rank shell (RANK_PRELUDE) runs before it execs the trainer; a SIGUSR1
    there used to kill the rank (bash's default action). It is recorded and handed over in
    SIDSCALE_STARTUP_SIGNALS, and startup_signals.install() records it for StopSignal."""
    import re
    import signal
    import subprocess
    import sys

    text = (Path(train.__file__).resolve().parents[1] / "slurm" / "distill.sh").read_text()
    prelude = re.search(r"^RANK_PRELUDE='\n(.*?)'$", text, re.S | re.M).group(1)
    # the signal arrives right after the traps (the first lines), before the interface choice and the exec
    lines = prelude.splitlines()
    after_traps = max(i for i, line in enumerate(lines) if line.startswith("trap ")) + 1 if any(
        line.startswith("trap ") for line in lines) else 0
    lines.insert(after_traps, "kill -USR1 $$")
    child = ("from sidscale import startup_signals; startup_signals.install(); "
             "print('pending', startup_signals.take())")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", SLURM_PROCID="0",
               SLURM_LOCALID="0", SLURMD_NODENAME="n1", GLOO_SOCKET_IFNAME="lo")
    proc = subprocess.run(["bash", "-c", "\n".join(lines), "distill-rank", sys.executable, "-c", child],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, f"the rank's shell died: rc {proc.returncode} {proc.stderr[-1000:]}"
    assert f"pending [{int(signal.SIGUSR1)}]" in proc.stdout, proc.stdout
