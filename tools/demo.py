"""`make demo`: the main job on the built-in default, end to end, on 2 CPU ranks.

Fits (once, cached) the toy teacher, distills it with the DeepSpeed trainer (ZeRO-2, bf16,
2 gloo ranks), exports the EMA generator, and prints the toy Frechet distances of the one-step
student and of the teacher's multi-step sampler against exact samples of the mixture.

``--family vp`` (default): the VP / eps toy teacher (teacher.kind toy) and SiD-LSG's settings, the
toy preset as it is. ``--family flow``: the flow-matching toy teacher (teacher.kind toy_flow, the
same UNet fitted to the exact velocity) with SiD-DiT's settings (``FLOW_SETTINGS``); the teacher's
sampler is then the flow Euler sampler (DDIM in the flow parameterisation).

    python tools/demo.py [--family vp|flow] [--run-dir runs/demo] [--nproc 2] [--set train.max_steps=100 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sidscale.distributed.runtime import free_port  # noqa: E402
from sidscale.terminal import sampler_title  # noqa: E402

# The flow job: the toy preset with the flow toy teacher and SiD-DiT's generator weighting (1 - sigma
# multiplies the loss; the generator starts from pure noise at sigma_init = 1 and the loss sigma is
# logit-normal(ln 2, 1.6): the method defaults). gen_loss_scale stays 1: under Adam a constant loss
# scale cancels (up to Adam's eps), so SiD-DiT's lsg = 100 would change nothing. The generator's lr is
# 3e-5 against the fake net's 1e-4, so the fake net keeps tracking the generator (as the reference
# loop's toy test does). Measured, 200 iterations, one step: toy Frechet 0.553 at the start -> 0.409
# (generator lr 1e-4, the VP demo's: 0.445). With --set method.generator_steps=4 the student starts at
# 0.268 (the teacher's own 4 Euler steps) and ends at 0.496: 200 iterations are too few for K = 4 here.
FLOW_SETTINGS = ("teacher.kind=toy_flow", "method.gen_weighting=one_minus_sigma", "generator.lr=3e-5")
RUN_DIRS = {"vp": "runs/demo", "flow": "runs/demo-flow"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(RUN_DIRS), default="vp",
                   help="vp: the VP toy teacher (default); flow: the flow-matching toy teacher, SiD-DiT settings")
    p.add_argument("--run-dir", default=None, help="default: runs/demo (vp), runs/demo-flow (flow)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--fresh", action="store_true", help="delete the run directory first")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir or RUN_DIRS[args.family])
    if args.fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    env = dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           f"--master_port={free_port()}", str(REPO / "sidscale" / "train.py"),
           "--config", "toy", "--run-dir", str(run_dir)]
    # the family's settings first, so that --set overrides them
    for s in [*(FLOW_SETTINGS if args.family == "flow" else ()), *args.set]:
        cmd += ["--set", s]
    print("+", " ".join(cmd), flush=True)
    start = time.time()
    code = subprocess.call(cmd, env=env, cwd=REPO)
    if code != 0:
        return code
    print(f"\ndemo finished in {time.time() - start:.0f} s; run directory {run_dir}")
    print_summary(run_dir)
    return 0


def run_config(run_dir: Path) -> dict:
    import yaml

    path = run_dir / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def skipped_evaluation(run_dir: Path) -> str | None:
    """Why the run has no toy evaluation to show (None: it has one)."""
    num = (run_config(run_dir).get("eval") or {}).get("num_samples")
    if num == 0:
        return "eval.num_samples = 0: no toy evaluation was made, so there is no comparison table"
    if not (run_dir / "toy_eval.json").is_file():
        return f"{run_dir / 'toy_eval.json'} was not written, so there is no comparison table"
    return None


def print_summary(run_dir: Path) -> None:
    """The comparison table of the run's toy evaluation, or one line saying why there is none."""
    reason = skipped_evaluation(run_dir)
    if reason is not None:
        print(f"  {reason}")
        print(f"  export: {run_dir / 'export'}  previews: {run_dir / 'samples'}  TensorBoard: {run_dir / 'tb'}")
        return
    result = json.loads((run_dir / "toy_eval.json").read_text())
    steps = result.get("generator_steps", 1)
    # toy_eval.json names the teacher's sampler; older ones do not: the flow toy teacher's is flow Euler
    flow = (run_config(run_dir).get("teacher") or {}).get("kind") == "toy_flow"
    sampler = result.get("teacher_sampler", "flow_euler" if flow else "ddim")
    sampler = sampler_title(sampler)
    rows = [(f"{'one' if steps == 1 else steps}-step student (EMA)", "one_step"),
            (f"teacher, {result['teacher_steps']}-step {sampler} cfg {result['teacher_cfg']}", "teacher_ddim"),
            ("exact samples (noise floor)", "exact")]
    print(f"  {'':38s} {'toy Frechet':>12s} {'prompt acc.':>12s} {'colour acc.':>12s}")
    for label, key in rows:
        fd = result.get("frechet_exact_vs_exact" if key == "exact" else f"frechet_{key}")
        if fd is not None:
            print(f"  {label:38s} {fd:12.4f} {result[f'prompt_accuracy_{key}']:12.1%} "
                  f"{result[f'colour_accuracy_{key}']:12.1%}")
    print("  (accuracy: share of images nearest to a component of their own prompt / colour; chance 4.2% / 16.7%)")
    print(f"  export: {run_dir / 'export'}  previews: {run_dir / 'samples'}  TensorBoard: {run_dir / 'tb'}")


if __name__ == "__main__":
    raise SystemExit(main())
