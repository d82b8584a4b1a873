"""Write tests/assets/pre_refactor_checkpoint/: a checkpoint of sidscale as it was before the
issue-24 redesign, and what an uninterrupted run reached from there.

Run once, with the code whose on-disk format is to be kept (it was sidscale ff5e98c):

    PYTHONPATH=$PWD DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 python tests/assets/make_pre_refactor_checkpoint.py

It builds a teacher small enough to commit (teacher/: diffusers layout, toy kind, ~10k-parameter
UNet, a byte-level CLIP tokenizer of 514 tokens), runs the trainer in-process uninterrupted from
step 0 to ``STEPS`` with a checkpoint every ``SAVE_AT`` steps, and keeps of that run only what a
resume needs: the checkpoint of step ``SAVE_AT``, the ``latest`` marker and the run's prompt shards.
expected.json records the digests of the run's final checkpoint (tests/trainer/test_pre_refactor_checkpoint.py
says what they cover) and its settings. ``--check`` runs it again into a temporary directory and
compares the digests with expected.json instead of writing (the run is deterministic on one CPU kind).
``--record-tensors`` runs it again the same way and, only when every digest equals expected.json's
(the same bits as the recorded run: safe with any code, on a CPU of the recorded capability), writes
the tensors of those digests to expected_tensors.pt, which tests on other CPUs compare with.

Never re-run it to write the asset after the redesign: the asset's whole point is that it was
written by the old code.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.trainer.test_pre_refactor_checkpoint import (  # noqa: E402
    ASSET,
    REFERENCE,
    SAVE_AT,
    STEPS,
    THREADS,
    checkpoint_digests,
    checkpoint_states,
    run_overrides,
)

# The toy preset's prompts (sidscale.families.toy.mixture.ToyMixture); the tokenizer covers every byte anyway.
TEXT_HIDDEN = 8


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map (the base alphabet of CLIP's BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_tokenizer(out: Path) -> int:
    """A CLIP BPE tokenizer with the byte alphabet and no merges (every word is spelled out): the
    real CLIPTokenizer class at 514 tokens instead of 49408, so the text encoder stays tiny."""
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 512, 513
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
              "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "do_lower_case": True}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    specials = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return len(vocab)


def write_teacher(path: Path) -> None:
    from diffusers import DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sidscale.families.toy.mixture import ToyMixture
    from sidscale.families.unet_vp.tiny import SD_SCHEDULER_CONFIG, build_tiny_unet, tiny_clip_text_config

    unet = build_tiny_unet(0, sample_size=8, block_out_channels=[8, 16], norm_num_groups=4,
                           attention_head_dim=2, cross_attention_dim=TEXT_HIDDEN)
    unet.save_pretrained(path / "unet")
    vocab = write_tokenizer(path / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(str(path / "tokenizer"))
    assert len(tok) == vocab and tok("a red circle").input_ids[0] == 512, "tokenizer not picked up"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        te = CLIPTextModel(CLIPTextConfig(**tiny_clip_text_config(
            TEXT_HIDDEN, vocab_size=vocab, bos_token_id=512, eos_token_id=513, pad_token_id=513)))
    te.save_pretrained(path / "text_encoder")
    DDPMScheduler(**SD_SCHEDULER_CONFIG).save_pretrained(path / "scheduler")
    (path / "toy_mixture.json").write_text(json.dumps(ToyMixture(size=8).to_dict()))
    print(f"teacher: unet {sum(p.numel() for p in unet.parameters())} parameters, "
          f"text encoder {sum(p.numel() for p in te.parameters())}")


def uninterrupted_run(teacher: Path, run_dir: Path) -> None:
    from tests.helpers.inprocess import run_main

    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        proc = run_main(run_dir, run_overrides(teacher, run_dir.parent / "cache"))
    finally:
        torch.set_num_threads(before)
    if proc.returncode != 0:
        sys.exit(f"the run failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="re-run and compare with expected.json, write nothing")
    ap.add_argument("--record-tensors", action="store_true",
                    help="re-run; when the digests equal expected.json's, write their tensors to expected_tensors.pt")
    args = ap.parse_args()
    args.check = args.check or args.record_tensors
    import deepspeed

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        teacher = ASSET / "teacher" if args.check else work / "teacher"
        if not args.check:
            write_teacher(teacher)
        run_dir = work / "run"
        uninterrupted_run(teacher, run_dir)
        digests = checkpoint_digests(run_dir / "checkpoints" / f"step_{STEPS:08d}", run_dir / "export")
        if args.check:
            want = json.loads((ASSET / "expected.json").read_text())["digests"]
            bad = sorted(k for k in want.keys() | digests.keys() if want.get(k) != digests.get(k))
            print("deterministic: same digests as expected.json" if not bad else f"DIFFERENT: {bad}")
            if args.record_tensors and not bad:
                torch.save(checkpoint_states(run_dir / "checkpoints" / f"step_{STEPS:08d}", run_dir / "export"),
                           REFERENCE)
                print(f"wrote {REFERENCE} ({REFERENCE.stat().st_size / 2**20:.2f} MiB)")
            sys.exit(1 if bad else 0)
        if ASSET.exists():
            shutil.rmtree(ASSET)
        shutil.copytree(teacher, ASSET / "teacher")
        keep = f"step_{SAVE_AT:08d}"
        shutil.copytree(run_dir / "checkpoints" / keep, ASSET / "run" / "checkpoints" / keep)
        (ASSET / "run" / "checkpoints" / "latest").write_text(keep + "\n")
        shutil.copytree(run_dir / "data", ASSET / "run" / "data")
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
        expected = {
            "written_by": {"sidscale_commit": commit, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
                           "python": platform.python_version(), "machine": platform.machine(),
                           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                           "torch_threads": THREADS},
            "save_at": SAVE_AT, "steps": STEPS,
            "overrides": run_overrides(Path("<teacher>"), Path("<cache>")),
            "digests": digests,
        }
        (ASSET / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    size = sum(p.stat().st_size for p in ASSET.rglob("*") if p.is_file())
    print(f"wrote {ASSET} ({size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
