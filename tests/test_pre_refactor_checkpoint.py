"""A checkpoint written by sidscale before the issue-24 redesign still resumes, bit for bit.

tests/assets/pre_refactor_checkpoint/ holds what tests/assets/make_pre_refactor_checkpoint.py kept of
a one-rank fp32 toy run of sidscale ff5e98c (ZeRO-2, the toy preset's stage): the checkpoint of step
SAVE_AT (both DeepSpeed engines with their Adam states, the rank file with the sharded EMA, RNG
states and data cursor, meta.json with its checksums), the ``latest`` marker, the run's prompt
shards, the teacher it distilled, and in expected.json the digests of the checkpoint that the same
run reached at step STEPS without interruption.

The test goes through the public surface only: the trainer's command line (run in-process), config
keys, the run directory layout and the files on disk (read with plain ``torch.load`` / safetensors),
never sidscale's internal modules, which the redesign moves.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch

ASSET = Path(__file__).resolve().parent / "assets" / "pre_refactor_checkpoint"
SAVE_AT, STEPS = 2, 4
# CPU kernels may sum in another order with another thread count: the run is recorded and replayed
# on one thread (the trainer sets none itself; tests/inprocess.py restores the count after the run).
THREADS = 1


def run_overrides(teacher: Path, cache: Path) -> list[str]:
    """The run's ``--set`` list: the toy preset in fp32, tiny and short."""
    return [
        f"teacher.path={teacher}", f"teacher.cache_dir={cache}", "teacher.dtype=fp32", "teacher.resolution=8",
        "train.precision=fp32", "train.global_batch=4", "train.micro_batch=2", "train.seed=3",
        f"train.max_steps={STEPS}", f"train.ckpt_every={SAVE_AT}", "train.keep_last=5", "train.log_every=1",
        "train.preview_every=1000", "train.ema_halflife_kimg=0.01", "generator.lr=1e-2", "fake.lr=1e-2",
        "data.shards=toy", "data.num_workers=1", "eval.num_samples=0",
    ]


# ------------------------------------------------------------------------------ digests
def _digest_into(h: hashlib._Hash, obj: object, where: str = "") -> None:
    """Feed ``obj`` into ``h``: tensors and arrays by dtype, shape and raw bytes (bit-exact), plain
    values by repr, containers in key order. Other objects (DeepSpeed's loss scaler, ...) are skipped:
    their repr may hold a memory address."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"{where}:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, np.ndarray):
        h.update(f"{where}:{obj.dtype}:{obj.shape}:".encode() + np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            _digest_into(h, obj[k], f"{where}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _digest_into(h, v, f"{where}[{i}]")
    elif obj is None or isinstance(obj, (bool, int, float, str, np.integer, np.floating)):
        h.update(f"{where}={obj!r};".encode())


def digest(obj: object) -> str:
    h = hashlib.sha256()
    _digest_into(h, obj)
    return h.hexdigest()


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _one(ckpt: Path, pattern: str) -> Path:
    found = sorted(ckpt.glob(pattern))
    assert len(found) == 1, f"{ckpt}: expected one {pattern}, found {[p.name for p in found]}"
    return found[0]


def checkpoint_digests(ckpt: Path, export: Path | None = None) -> dict[str, object]:
    """What a bit-exact continuation must reproduce, read from a one-rank checkpoint directory:
    each engine's weights and Adam state (moments, step counts, fp32 master partition), the EMA
    shard, the data cursor (literally), the counters, and the exported EMA generator.

    Not the RNG states: the run seeds nothing global (its noise comes from generators seeded by
    (seed, step, phase, index)), so numpy's and Python's are the process's random start-up states,
    never the same twice; the test checks instead that the resume restored them."""
    out: dict[str, object] = {}
    for tag in ("generator", "fake"):
        model = _load(_one(ckpt / tag, "*model_states.pt"))
        out[f"{tag}.weights"] = digest(model["module"])
        out[f"{tag}.optimizer"] = digest(_load(_one(ckpt / tag, "*optim_states.pt"))["optimizer_state_dict"])
        out[f"{tag}.global_steps"] = int(model["global_steps"])
    rank = _load(ckpt / "rank_00000.pt")
    out["ema"] = digest(rank["ema"]["shards"])
    out["data"] = json.loads(json.dumps(rank["data"]))
    out["step"], out["images_seen"] = int(rank["step"]), int(rank["images_seen"])
    meta = json.loads((ckpt / "meta.json").read_text())
    out["meta.step"], out["meta.images_seen"] = meta["step"], meta["images_seen"]
    if export is not None:
        from safetensors.torch import load_file

        out["export.unet"] = digest(load_file(_one(export / "unet", "*.safetensors")))
    return out


# ------------------------------------------------------------------------------ the test
def test_pre_refactor_checkpoint_resumes_bit_for_bit(tmp_path):
    from tests.inprocess import run_main

    expected = json.loads((ASSET / "expected.json").read_text())
    assert (expected["save_at"], expected["steps"]) == (SAVE_AT, STEPS)
    run_dir = tmp_path / "run"
    shutil.copytree(ASSET / "run", run_dir)
    teacher = shutil.copytree(ASSET / "teacher", tmp_path / "teacher")
    saved = run_dir / "checkpoints" / f"step_{SAVE_AT:08d}"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", saved.name]

    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        proc = run_main(run_dir, run_overrides(teacher, tmp_path / "cache"))
    finally:
        torch.set_num_threads(before)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]

    # a resume, not a fresh start: from the asset's checkpoint at its step, and only the steps after it
    assert f"resumed from {saved} (step {SAVE_AT})" in proc.stdout, proc.stdout
    assert "prompt stream layout changed" not in proc.stderr  # the data cursor was taken as it is
    assert not (run_dir / "checkpoints" / "step_00000000").exists()
    final = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == final.name

    # the RNG states were restored from the checkpoint (they are process-random otherwise). Nothing in the
    # continuation draws from numpy or Python; the global torch RNG gives exactly one draw when the prompt
    # stream's DataLoader iterator is opened again after the resume (DataLoader's base seed; the
    # uninterrupted run had drawn it at step 0, before the save)
    restored = _load(saved / "rank_00000.pt")["rng"]
    now = _load(final / "rank_00000.pt")["rng"]
    assert digest(now["numpy"]) == digest(restored["numpy"]), "numpy's RNG state was not restored"
    assert digest(now["python"]) == digest(restored["python"]), "Python's RNG state was not restored"
    g = torch.Generator()
    g.set_state(restored["torch"])
    torch.empty((), dtype=torch.int64).random_(generator=g)
    assert torch.equal(now["torch"], g.get_state()), "torch's RNG state is not the restored one after one draw"

    got = checkpoint_digests(final, run_dir / "export")
    want = expected["digests"]
    different = sorted(k for k in want.keys() | got.keys() if got.get(k) != want.get(k))
    assert not different, (
        f"the continuation from the pre-redesign checkpoint differs from the uninterrupted run in {different}: "
        + "; ".join(f"{k}: got {got.get(k)!r}, want {want.get(k)!r}" for k in different)
        + f" (recorded with {expected['written_by']}; torch {torch.__version__})")
