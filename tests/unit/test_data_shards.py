"""Prompt shard writer + CLI: filters, manifest, read-back, input formats, refusing to clobber."""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from sidscale.data.shards import read_prompt_file, write_prompt_shards
from sidscale.data.stream import PromptStream

REPO = Path(__file__).resolve().parents[2]
CLI = REPO / "tools" / "make_prompt_shards.py"
COCO = Path("/work/shared/data/coco2014_val_captions_30k.txt")


def _load_cli_main():
    # tools/ is not a package: load the script by path
    spec = importlib.util.spec_from_file_location("make_prompt_shards", CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def read_back(out: Path) -> list[str]:
    """All prompts of an output dir in manifest order, read with plain tarfile (independent of the reader)."""
    manifest = json.loads((out / "manifest.json").read_text())
    prompts = []
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["path"]) as tf:
            members = tf.getmembers()
            assert len(members) == shard["count"]
            prompts += [tf.extractfile(m).read().decode("utf-8") for m in members]
    return prompts


def expected_after_filters(lines: list[str], min_chars: int, max_chars: int, dedupe: bool):
    kept, dropped, seen = [], Counter(), set()
    for line in lines:
        p = line.strip()
        reason = ("empty" if not p else "too_short" if len(p) < min_chars
                  else "too_long" if len(p) > max_chars else "duplicate" if dedupe and p in seen else None)
        if reason:
            dropped[reason] += 1
        else:
            seen.add(p)
            kept.append(p)
    return kept, dropped


def content_hash(prompts: list[str]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        b = p.encode()
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


@pytest.mark.skipif(not COCO.is_file(), reason="COCO captions not available")
def test_cli_round_trip_on_coco_captions(tmp_path):
    out = tmp_path / "coco"
    args = [sys.executable, str(CLI), str(COCO), "--out", str(out), "--shard-size", "4000", "--dedupe",
            "--min-chars", "30", "--max-chars", "70"]
    res = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = COCO.read_text(encoding="utf-8").split("\n")
    lines = lines[:-1] if lines[-1] == "" else lines  # the file's final newline ends a line, adds none
    kept, dropped = expected_after_filters(lines, 30, 70, dedupe=True)
    assert dropped["duplicate"] > 0 and dropped["too_short"] > 0 and dropped["too_long"] > 0

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seen"] == len(lines) == 30000
    assert manifest["total"] == len(kept) == sum(s["count"] for s in manifest["shards"])
    assert {k: v for k, v in manifest["dropped"].items() if v} == dict(dropped)
    assert manifest["content_sha256"] == content_hash(kept)
    names = [s["path"] for s in manifest["shards"]]
    assert names == [f"prompts-{i:06d}.tar" for i in range(len(names))]
    assert all(s["count"] == 4000 for s in manifest["shards"][:-1])
    assert read_back(out) == kept
    assert json.loads(res.stdout)["total"] == len(kept)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind

    # the streaming reader gives back the same multiset in one epoch
    s = PromptStream(str(out / "manifest.json"), rank=0, world_size=1, batch_size=100, seed=0, num_workers=0,
                     resampled=False)
    got = []
    while s.stats()["epochs"] < 1:
        b = next(s)
        got += [p for p, e in zip(b["prompts"], b["epoch"], strict=True) if e == 0]
    assert Counter(got) == Counter(kept)

    # a second run into the same, now non-empty, directory is refused
    again = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "not empty" in again.stderr


def test_filters_are_counted_and_bytes_decoded(tmp_path):
    items = ["a cat", "  a cat  ", "", "   ", "ab", "x" * 50, b"a dog", b"caf\xe9", "a dog", "a bird"]
    m = write_prompt_shards(items, tmp_path / "o", shard_size=2, dedupe=True, min_chars=3, max_chars=20)
    assert m["dropped"] == {"empty": 2, "too_short": 1, "too_long": 1, "duplicate": 2, "undecodable": 1,
                            "malformed": 0}
    assert read_back(tmp_path / "o") == ["a cat", "a dog", "a bird"]
    assert [s["count"] for s in m["shards"]] == [2, 1] and m["total"] == 3 and m["seen"] == len(items)
    assert m["settings"] == {"shard_size": 2, "dedupe": True, "min_chars": 3, "max_chars": 20, "strip": True}


def test_refuses_non_empty_dir_and_overwrite_replaces_all_shards(tmp_path):
    out = tmp_path / "o"
    write_prompt_shards([f"prompt {i}" for i in range(10)], out, shard_size=2)
    assert len(list(out.glob("prompts-*.tar"))) == 5
    with pytest.raises(FileExistsError, match="not empty"):
        write_prompt_shards(["x"], out)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hi")
    with pytest.raises(FileExistsError):
        write_prompt_shards(["x"], tmp_path / "other")
    m = write_prompt_shards(["new one", "new two", "new three"], out, shard_size=2, overwrite=True)
    assert sorted(p.name for p in out.glob("prompts-*.tar")) == [s["path"] for s in m["shards"]]
    assert read_back(out) == ["new one", "new two", "new three"]


def test_output_is_reproducible(tmp_path):
    prompts = [f"prompt {i}" for i in range(25)]
    write_prompt_shards(prompts, tmp_path / "a", shard_size=10)
    write_prompt_shards(prompts, tmp_path / "b", shard_size=10)
    for name in ("prompts-000000.tar", "prompts-000002.tar", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_jsonl_csv_tsv_gz_inputs(tmp_path):
    main = _load_cli_main()  # in-process: the subprocess path is tested above
    with gzip.open(tmp_path / "a.jsonl.gz", "wb") as f:
        f.write(b'{"text": "from jsonl"}\n{"caption": "wrong field"}\nnot json\n\n"a string"\n'
                b'{"text": "bad \xff byte"}\n{"text": "line\\nbreak kept"}\n')
    with open(tmp_path / "b.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerows([["id", "prompt"], ["1", "from csv, with a comma"], ["2", ""], ["3", 'quoted "csv"']])
    (tmp_path / "c.tsv").write_text("prompt\tx\nfrom tsv\t1\n", encoding="utf-8")
    with gzip.open(tmp_path / "d.txt.gz", "wb") as f:
        f.write(b"from gz txt\r\n\xff\xfe\nfrom jsonl\n")
    inputs = [str(tmp_path / n) for n in ("a.jsonl.gz", "b.csv", "c.tsv", "d.txt.gz")]
    out = tmp_path / "o"
    rc = main([*inputs, "--out", str(out), "--field", "text", "--column", "prompt", "--dedupe"])
    assert rc == 0
    assert read_back(out) == ["from jsonl", "line\nbreak kept", "from csv, with a comma", 'quoted "csv"',
                              "from tsv", "from gz txt"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["dropped"] == {"empty": 2, "too_short": 0, "too_long": 0, "duplicate": 1, "undecodable": 2,
                            "malformed": 3}
    assert m["sources"] == inputs
    with pytest.raises(ValueError, match="no column 'nope'"):
        list(read_prompt_file(tmp_path / "b.csv", column="nope"))
    assert main([str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x")]) == 2
