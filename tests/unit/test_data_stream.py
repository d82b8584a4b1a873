"""PromptStream: rank/worker splits, infinite resampling, exact resume, bad data, clear errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from sidscale.data.shards import tar_bytes, write_prompt_shards
from sidscale.data.stream import DataWarning, PromptStream, _Counters, read_shard, resolve_shards

N_PROMPTS, SHARD_SIZE = 96, 12  # 8 shards: enough for 2 ranks x 2 workers, small enough to loop fast
PROMPTS = [f"prompt number {i:03d}" for i in range(N_PROMPTS)]


def toy_tokenize(prompts: list[str]) -> torch.Tensor:
    # module-level (picklable) and content-dependent, so equal ids mean equal prompts
    return torch.tensor([[int(p.split()[-1]), len(p), os.getpid()] for p in prompts])


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_prompt_shards(PROMPTS, out, shard_size=SHARD_SIZE)
    return out


def pattern(d: Path) -> str:
    return str(d / "prompts-{000000..000007}.tar")


def take(stream: PromptStream, n: int) -> list[dict]:
    batches = [next(stream) for _ in range(n)]
    stream.close()
    return batches


def test_epoch_mode_ranks_x_workers_read_disjoint_complete_epochs(shard_dir):
    per_epoch: dict[int, list[str]] = {0: [], 1: []}
    orders = []
    for rank in range(2):
        s = PromptStream(pattern(shard_dir), rank=rank, world_size=2, batch_size=5, seed=3, num_workers=2,
                         shuffle_buffer=7, resampled=False)
        seen: list[tuple[str, int]] = []
        while s.stats()["epochs"] < 2:  # every worker of this rank has moved past epoch 1
            b = next(s)
            seen += zip(b["prompts"], b["epoch"], strict=True)
            assert len(seen) < 10 * N_PROMPTS, "stream did not advance epochs"
        s.close()
        for e in (0, 1):
            per_epoch[e] += [p for p, pe in seen if pe == e]
        orders.append([p for p, pe in seen if pe == 0])
    for e in (0, 1):  # no prompt lost or duplicated across ranks x workers
        assert Counter(per_epoch[e]) == Counter(PROMPTS), f"epoch {e} not an exact cover"
    assert set(orders[0]).isdisjoint(orders[1])
    assert per_epoch[0] != per_epoch[1]  # reshuffled per epoch


def test_resampled_is_infinite_and_differs_per_rank(shard_dir):
    seqs = []
    for rank in range(2):
        s = PromptStream(pattern(shard_dir), rank=rank, world_size=2, batch_size=8, seed=0, num_workers=2)
        batches = take(s, 3 * N_PROMPTS // 8)  # 3 x the whole data set per rank
        seqs.append([p for b in batches for p in b["prompts"]])
        assert set(seqs[-1]) <= set(PROMPTS)
        assert s.stats()["epochs"] >= 2 and s.stats()["samples"] == 3 * N_PROMPTS
    assert seqs[0] != seqs[1]
    assert seqs[0][:16] != seqs[0][N_PROMPTS:N_PROMPTS + 16]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("resampled", [False, True])
def test_resume_continues_identical_sequence(shard_dir, num_workers, resampled):
    # rank 1 of 2: each worker has 24 (epoch mode) samples per epoch, so 30 batches of 5 cross
    # several epoch boundaries; cuts: mid-epoch, right after a boundary, deep in a later epoch
    kw = dict(rank=1, world_size=2, batch_size=5, seed=11, num_workers=num_workers, shuffle_buffer=10,
              resampled=resampled, tokenize=toy_tokenize)
    n = 30
    ref_stream = PromptStream(pattern(shard_dir), **kw)
    ref = take(ref_stream, n)
    for cut in (3, 11, 23):
        first = PromptStream(pattern(shard_dir), **kw)
        head = take(first, cut)
        state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON checkpoint
        resumed = PromptStream(pattern(shard_dir), **kw)
        resumed.load_state_dict(state)
        tail = take(resumed, n - cut)
        got = head + tail
        assert [b["prompts"] for b in got] == [b["prompts"] for b in ref], f"cut={cut}"
        for a, b in zip(got, ref, strict=True):  # (column 2 is the tokenizing pid)
            assert torch.equal(a["input_ids"][:, :2], b["input_ids"][:, :2])
        assert resumed.stats() == ref_stream.stats(), f"cut={cut}"
    assert ref_stream.stats()["epochs"] >= 2


def test_tokenize_runs_in_workers_and_skipped_samples_are_not_tokenized(shard_dir):
    s = PromptStream(pattern(shard_dir), rank=0, world_size=1, batch_size=4, seed=0, num_workers=2,
                     tokenize=toy_tokenize)
    b = next(s)
    s.close()
    assert b["input_ids"].dtype == torch.long and b["input_ids"].shape == (4, 3)
    assert int(b["input_ids"][0, 2]) != os.getpid()

    calls = []

    def counting_tokenize(prompts: list[str]) -> torch.Tensor:
        calls.append(len(prompts))
        return toy_tokenize(prompts)

    first = PromptStream(pattern(shard_dir), rank=0, world_size=1, batch_size=4, seed=0, num_workers=0)
    take(first, 20)
    resumed = PromptStream(pattern(shard_dir), rank=0, world_size=1, batch_size=4, seed=0, num_workers=0,
                           tokenize=counting_tokenize)
    resumed.load_state_dict(first.state_dict())
    take(resumed, 2)
    assert calls == [4, 4]  # the 80 fast-skipped samples never reached the tokenizer


def test_world_size_change_restarts_saved_epoch_and_keeps_counters(shard_dir):
    old = PromptStream(pattern(shard_dir), rank=0, world_size=2, batch_size=5, seed=1, num_workers=2,
                       resampled=False)
    take(old, 14)  # 70 samples > one epoch share (48) of this rank: both workers are in epoch 1
    state = old.state_dict()
    saved_epoch = min(w["epoch"] for w in state["workers"])
    assert saved_epoch == 1
    new = PromptStream(pattern(shard_dir), rank=0, world_size=1, batch_size=5, seed=1, num_workers=2,
                       resampled=False)
    with pytest.warns(DataWarning, match="layout changed"):
        new.load_state_dict(state)
    assert new.stats()["samples"] == old.stats()["samples"]
    seen = []
    while new.stats()["epochs"] < 2:
        b = next(new)
        seen += [p for p, e in zip(b["prompts"], b["epoch"], strict=True) if e == saved_epoch]
    new.close()
    assert Counter(seen) == Counter(PROMPTS)  # the whole saved epoch, once, under the new split
    assert new.stats()["samples"] > old.stats()["samples"]


# ----------------------------------------------------------------------------------------------
# Bad data


def _bad_data_dir(tmp_path: Path, good_dir: Path) -> tuple[Path, list[str]]:
    """Good shards, three truncated ones, a non-tar file and a shard of bad samples; + expected prompts."""
    d = tmp_path / "bad"
    d.mkdir()
    expected: list[str] = []
    # member = 512-byte header + one 512-byte data block (prompts are short)
    cuts = {1: 5 * 1024 + 700, 2: 3 * 1024, 3: 2 * 1024 + 100}  # mid-data, at a boundary, mid-header
    for i in range(6):
        src = good_dir / f"prompts-{i:06d}.tar"
        data = src.read_bytes()
        prompts = PROMPTS[i * SHARD_SIZE:(i + 1) * SHARD_SIZE]
        if i in cuts:
            data = data[:cuts[i]]
            prompts = prompts[:cuts[i] // 1024]  # every complete sample before the break survives
        (d / f"shard-{i}.tar").write_bytes(data)
        expected += prompts
    (d / "shard-6.tar").write_bytes(b"this is not a tar file at all" * 40)
    (d / "shard-7.tar").write_bytes(tar_bytes([
        ("ok1.txt", b"a fine prompt"), ("nometa.json", b"{}"), ("bad.txt", b"caf\xe9 \xff"),
        ("blank.txt", b"  \n "), ("ok2.txt", "caf\u00e9 au lait".encode()),
    ]))
    return d, expected + ["a fine prompt", "caf\u00e9 au lait"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_data_is_skipped_and_counted(tmp_path, shard_dir, num_workers):
    d, expected = _bad_data_dir(tmp_path, shard_dir)
    s = PromptStream(str(d / "shard-{0..7}.tar"), rank=0, world_size=1, batch_size=3, seed=5,
                     num_workers=num_workers, shuffle_buffer=4, resampled=False)
    seen = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        while s.stats()["epochs"] < 1:
            b = next(s)
            seen += [p for p, e in zip(b["prompts"], b["epoch"], strict=True) if e == 0]
    s.close()
    assert Counter(seen) == Counter(expected)
    stats = s.stats()  # >=: workers read ahead into the next epoch
    assert stats["skipped_corrupt_shards"] >= 4 and stats["skipped_missing_text"] >= 1
    assert stats["skipped_undecodable"] >= 1 and stats["skipped_empty"] >= 1
    if num_workers == 0:  # (warnings of worker processes go to their stderr, not to this process)
        text = "\n".join(str(w.message) for w in record if issubclass(w.category, DataWarning))
        for name in ("shard-1.tar", "shard-2.tar", "shard-3.tar", "shard-6.tar", "shard-7.tar"):
            assert name in text


def test_read_shard_counts_each_bad_thing_once(tmp_path, shard_dir):
    d, expected = _bad_data_dir(tmp_path, shard_dir)
    counters = _Counters({})
    with pytest.warns(DataWarning):
        got = [p for i in range(8) for _, p in read_shard(str(d / f"shard-{i}.tar"), counters)]
    assert got == expected  # shard order, member order
    assert counters.values == {"samples": 0, "shards_opened": 8, "skipped_corrupt_shards": 4,
                               "skipped_empty": 1, "skipped_missing_text": 1, "skipped_undecodable": 1}


def test_only_bad_shards_raise_instead_of_hanging(tmp_path):
    for i in range(2):
        (tmp_path / f"junk-{i}.tar").write_bytes(b"\x00junk" * 100)
    s = PromptStream(str(tmp_path / "junk-{0..1}.tar"), rank=0, world_size=1, batch_size=2, seed=0,
                     num_workers=0)
    with pytest.warns(DataWarning), pytest.raises(RuntimeError, match="no valid prompt"):
        next(s)


# ----------------------------------------------------------------------------------------------
# Shard resolution errors


def test_resolve_and_construction_errors(tmp_path, shard_dir):
    assert resolve_shards(str(shard_dir / "manifest.json")) == resolve_shards(pattern(shard_dir))
    assert resolve_shards(str(shard_dir)) == resolve_shards(str(shard_dir / "prompts-*.tar"))
    with pytest.raises(ValueError, match=re.escape("nothing-{0..3}.tar")):
        PromptStream(str(tmp_path / "nothing-{0..3}.tar"), rank=0, world_size=1, batch_size=2, seed=0)
    partial = tmp_path / "partial"
    shutil.copytree(shard_dir, partial)
    (partial / "prompts-000003.tar").unlink()
    with pytest.raises(FileNotFoundError, match="prompts-000003.tar"):
        resolve_shards(pattern(partial))
    with pytest.raises(FileNotFoundError, match="prompts-000003.tar"):
        PromptStream(str(partial / "manifest.json"), rank=0, world_size=1, batch_size=2, seed=0)
    with pytest.raises(ValueError, match=r"8 shards.*4 x 4 = 16"):
        PromptStream(pattern(shard_dir), rank=0, world_size=4, batch_size=2, seed=0, num_workers=4)
    with pytest.raises(ValueError, match="rank 2"):
        PromptStream(pattern(shard_dir), rank=2, world_size=2, batch_size=2, seed=0)


def test_elastic_merge_restarts_the_earliest_unfinished_epoch_and_sums_counters(shard_dir):
    """Elastic resume (2 ranks -> 1 and 3): the new ranks restart at the earliest epoch ANY old rank
    had not finished (old rank 1 is still in epoch 0 while rank 0 is in epoch 1), and the old
    counters are carried once, on new rank 0 (the job's totals stay right)."""
    from sidscale.checkpointing.elastic import merged_stream_state

    def stream(rank: int, world: int) -> PromptStream:
        return PromptStream(pattern(shard_dir), rank=rank, world_size=world, batch_size=5, seed=1, num_workers=2,
                            resampled=False)

    olds = [stream(0, 2), stream(1, 2)]
    take(olds[0], 14)  # into epoch 1
    take(olds[1], 4)  # still in epoch 0
    states = [s.state_dict() for s in olds]
    total = sum(s.stats()["samples"] for s in olds)
    assert min(w["epoch"] for w in states[0]["workers"]) == 1
    new = stream(0, 1)
    with pytest.warns(DataWarning, match="start of epoch 0"):
        new.load_state_dict(merged_stream_state(states, rank=0))
    assert new.stats()["samples"] == total
    seen = []
    while new.stats()["epochs"] < 1:
        b = next(new)
        seen += [p for p, e in zip(b["prompts"], b["epoch"], strict=True) if e == 0]
    new.close()
    assert Counter(seen) == Counter(PROMPTS)  # epoch 0 again, whole, under the new split
    other = stream(2, 3)
    with pytest.warns(DataWarning):
        other.load_state_dict(merged_stream_state(states, rank=2))
    assert other.stats()["samples"] == 0 and other.stats()["epochs"] == 0
    assert merged_stream_state([{}, {}], rank=0) == {}  # an indexed source keeps no state
