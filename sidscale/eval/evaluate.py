"""FID / CLIP-score evaluation of a one-step generator (and optionally its teacher) with the
paper's protocol; the logic behind ``tools/fid_eval.py`` (see its docstring for usage).

OUT/images/{i:06d}.png          one-step images (resumable; sharded over ranks)
OUT/teacher_images/             the teacher's DDIM images (--teacher-steps > 0)
OUT/export/                     the EMA generator exported from a checkpoint (--model CHECKPOINT)
OUT/ref_stats.npz               cached statistics of --ref-dir
OUT/metrics.json                written last, atomically (its presence means "evaluated")
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sidscale.eval.clip_score import CLIP_PREFIX, DEFAULT_CLIP_MODEL, ClipScorer, check_clip_file, clip_score_files
from sidscale.eval.fid import (
    PROTOCOL,
    EvalWeightsError,
    FeatureFn,
    cached_folder_stats,
    check_inception_file,
    fid_from_features,
    load_inception,
    load_stats,
    timed_features,
)
from sidscale.eval.generate import (
    generate_images,
    one_step_sampler,
    rank_from_env,
    read_prompts,
    teacher_sampler,
    wait_for_images,
)
from sidscale.eval.images import image_path
from sidscale.eval.model_source import ModelDirError, ModelSource, resolve_model
from sidscale.io_utils import atomic_write_json

log = logging.getLogger("sidscale.eval")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="export dir (unet/ + sidscale.json) or checkpoint dir")
    p.add_argument("--prompts", required=True, type=Path, help="one prompt per line; image i uses line i, seed i")
    p.add_argument("--num", type=int, default=None, help="first N prompts (default: all)")
    ref = p.add_mutually_exclusive_group(required=True)
    ref.add_argument("--ref-stats", type=Path, help="npz with mu, sigma (tools/ref_stats.py)")
    ref.add_argument("--ref-dir", type=Path, help="reference images; statistics cached in OUT/ref_stats.npz")
    p.add_argument("--inception-weights", required=True, type=Path, help="local inception-2015-12-05.pt")
    p.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL, help="open_clip architecture name")
    p.add_argument("--clip-weights", type=Path, default=None,
                   help="local open_clip weights file (laion2b_s12b_b42k for ViT-g-14); omitted: no CLIP score")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--batch", type=int, default=16, help="generation batch (image i depends on it at float noise)")
    p.add_argument("--feature-batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image decode workers")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--teacher-steps", type=int, default=0, help="> 0: also evaluate the teacher's DDIM sampler")
    p.add_argument("--teacher-cfg", type=float, default=3.0)
    p.add_argument("--wait-timeout", type=float, default=4 * 3600.0, help="rank 0 waits this long for other ranks")
    p.add_argument("--rank", type=int, default=None, help="override RANK / SLURM_PROCID (testing)")
    p.add_argument("--world-size", type=int, default=None, help="override WORLD_SIZE / SLURM_NTASKS (testing)")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write eval/* scalars to RUN/tb")
    return p


def image_set_metrics(
    folder: Path, prompts: Sequence[str], feature_fn: FeatureFn, ref: tuple[np.ndarray, np.ndarray],
    scorer: ClipScorer | None, args: argparse.Namespace, device: str,
) -> dict:
    files = [image_path(folder, i) for i in range(len(prompts))]
    feats, feat_rate = timed_features(files, feature_fn, device=device, batch=args.feature_batch,
                                      workers=args.workers, description=f"features {folder.name}")
    out = {"fid": fid_from_features(feats, *ref), "feature_images_per_s": feat_rate, "num_images": len(files)}
    if scorer is not None:
        out["clip_score"], out["clip_images_per_s"] = clip_score_files(scorer, files, prompts, args.feature_batch)
    else:
        out["clip_score"] = None
    with Image.open(files[0]) as im:
        out["image_size"] = list(im.size)
    return out


def write_tensorboard(run_dir: Path, step: int, values: dict[str, float]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tb"))
    try:
        for k, v in values.items():
            writer.add_scalar(k, v, step)
    finally:
        writer.close()


def evaluate(args: argparse.Namespace) -> dict | None:
    ri = rank_from_env(args.rank, args.world_size)
    use_cuda = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
    device = f"cuda:{ri.local_rank}" if use_cuda else "cpu"
    dtype = "fp16" if use_cuda else "fp32"  # the protocol generates in fp16; CPUs have no fast fp16
    # Check every input before spending hours generating: a missing weights file should fail now.
    prompts = read_prompts(args.prompts, args.num)
    if args.batch < 1:
        raise ValueError(f"--batch {args.batch}: must be >= 1")
    check_inception_file(args.inception_weights)
    if args.clip_weights is not None:
        check_clip_file(args.clip_model, args.clip_weights)
    if args.ref_stats is not None:
        load_stats(args.ref_stats)
    elif not args.ref_dir.is_dir():
        raise FileNotFoundError(f"--ref-dir {args.ref_dir}: not a directory of reference images")
    args.out.mkdir(parents=True, exist_ok=True)
    src = resolve_model(args.model, args.out, ri.rank)

    sample = one_step_sampler(src.export_dir, device, dtype)
    gen_n, gen_s = generate_images(sample, prompts, args.out / "images", args.batch, ri.rank, ri.world)
    del sample
    teacher_gen = None
    if args.teacher_steps > 0:
        sample = teacher_sampler(src.sampling, device, dtype, args.teacher_steps, args.teacher_cfg)
        teacher_gen = generate_images(sample, prompts, args.out / "teacher_images", args.batch, ri.rank, ri.world)
        del sample
    if use_cuda:
        torch.cuda.empty_cache()
    if ri.rank != 0:
        log.info("rank %d: generated %d images; rank 0 computes the metrics", ri.rank, gen_n)
        return None

    wait_for_images(args.out / "images", len(prompts), args.wait_timeout)
    if teacher_gen is not None:
        wait_for_images(args.out / "teacher_images", len(prompts), args.wait_timeout)
    return compute_and_write_metrics(args, src, prompts, device, dtype, ri.world, (gen_n, gen_s), teacher_gen)


def compute_and_write_metrics(
    args: argparse.Namespace, src: ModelSource, prompts: list[str], device: str, dtype: str, world: int,
    gen: tuple[int, float], teacher_gen: tuple[int, float] | None,
) -> dict:
    feature_fn = load_inception(args.inception_weights, device)
    if args.ref_stats is not None:
        mu, sigma, ref_meta = load_stats(args.ref_stats)
        ref_info = {"ref_stats": str(args.ref_stats.resolve()), **ref_meta}
    else:
        mu, sigma, ref_meta = cached_folder_stats(args.ref_dir, args.out / "ref_stats.npz", args.inception_weights,
                                                  feature_fn, device=device, batch=args.feature_batch,
                                                  workers=args.workers, description="features reference")
        ref_info = {"ref_dir": str(args.ref_dir.resolve()), **ref_meta}
    scorer = None
    if args.clip_weights is not None:
        from sidscale.eval.clip_score import load_clip

        scorer = load_clip(args.clip_model, args.clip_weights, device)

    def rate(g: tuple[int, float]) -> float | None:
        return g[0] / g[1] if g[0] and g[1] > 0 else None

    metrics = image_set_metrics(args.out / "images", prompts, feature_fn, (mu, sigma), scorer, args, device)
    metrics.update({
        "step": src.step, "model": str(src.path.resolve()), "model_kind": src.kind,
        "export_dir": str(src.export_dir.resolve()),
        # images/s of rank 0 over the images it generated in THIS invocation (None when all were on disk)
        "gen_images_per_s": rate(gen), "gen_images_this_run": gen[0], "world_size": world,
        "protocol": {
            "prompts": str(args.prompts.resolve()), "seed": "image i uses prompt i and seed i",
            "t_init": src.sampling.get("t_init"), "steps": int(src.sampling.get("generator_steps", 1)),
            "family": src.sampling.get("family", "unet_vp"), "device": device, "dtype": dtype,
            "batch": args.batch, "pixels": "uint8(clip(x*127.5+128, 0, 255))", "fid": PROTOCOL,
            "reference": ref_info, "clip_model": args.clip_model if scorer else None,
            "clip_weights": str(args.clip_weights) if scorer else None, "clip_prefix": CLIP_PREFIX,
            "clip_score": "mean cosine similarity (not x100)",
        },
    })
    if teacher_gen is not None:
        t = image_set_metrics(args.out / "teacher_images", prompts, feature_fn, (mu, sigma), scorer, args, device)
        t.update({"ddim_steps": args.teacher_steps, "cfg": args.teacher_cfg, "gen_images_per_s": rate(teacher_gen),
                  "teacher_path": src.sampling.get("teacher_path")})
        metrics["teacher"] = t
    atomic_write_json(args.out / "metrics.json", metrics)
    if src.run_dir is not None and src.step is not None and not args.no_tensorboard:
        scalars = {"eval/fid": metrics["fid"]}
        if metrics["clip_score"] is not None:
            scalars["eval/clip_score"] = metrics["clip_score"]
        write_tensorboard(src.run_dir, int(src.step), scalars)
    return metrics


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        metrics = evaluate(args)
    except (EvalWeightsError, ModelDirError, FileNotFoundError, TimeoutError) as e:
        # bad input: the message says what is wrong and what is expected; a traceback adds nothing
        print(f"fid_eval: error: {e}", file=sys.stderr)
        return 2
    if metrics is not None:
        summary = {k: metrics[k] for k in ("fid", "clip_score", "num_images", "step")}
        if "teacher" in metrics:
            summary["teacher"] = {k: metrics["teacher"][k] for k in ("fid", "clip_score")}
        print(f"{args.out / 'metrics.json'}: {summary}")
    return 0
