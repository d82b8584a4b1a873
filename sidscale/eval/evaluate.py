"""FID / CLIP-score evaluation of a one- or K-step generator of any family (and optionally its
teacher) with a published protocol (``--protocol``, sidscale/eval/protocols.py); the logic behind
``tools/fid_eval.py`` (see its docstring for usage).

OUT/images/{i:06d}.png          the generator's images (resumable; sharded over ranks)
OUT/teacher_images/             the teacher's multi-step images (--teacher-steps > 0)
OUT/export/                     the EMA generator exported from a checkpoint (--model CHECKPOINT)
OUT/ref_stats.npz               cached statistics of --ref-dir
OUT/metrics.json                written last, atomically (its presence means "evaluated")

``--plot RUN`` draws FID and CLIP score against kimg of every RUN/eval/*/metrics.json into one PNG.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sidscale.core.io import atomic_write_json
from sidscale.eval.clip_score import DEFAULT_CLIP_MODEL, ClipScorer, check_clip_file, clip_score_files
from sidscale.eval.fid import (
    EvalWeightsError,
    FeatureFn,
    RefStatsError,
    cached_folder_stats,
    check_inception_file,
    check_stats_protocol,
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
from sidscale.eval.protocols import DEFAULT_PROTOCOL, PROTOCOLS, EvalProtocol, ProtocolError, get_protocol
from sidscale.terminal import quiet_third_party

log = logging.getLogger("sidscale.eval")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path,
                   help="export dir (unet/ or transformer/ + sidscale.json) or checkpoint dir")
    p.add_argument("--prompts", required=True, type=Path,
                   help="one prompt per line (stripped; empty lines skipped); image i uses prompt i, seed i")
    p.add_argument("--protocol", default=DEFAULT_PROTOCOL, choices=sorted(PROTOCOLS),
                   help="the published evaluation to reproduce (sidscale/eval/protocols.py); default %(default)s")
    p.add_argument("--num", type=int, default=None,
                   help="first N prompts (default: the protocol's count, or all prompts if the file has fewer)")
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
    p.add_argument("--teacher-steps", type=int, default=0,
                   help="> 0: also evaluate the teacher's multi-step sampler (VP: DDIM; SD3: flow Euler)")
    p.add_argument("--teacher-cfg", type=float, default=3.0)
    p.add_argument("--wait-timeout", type=float, default=4 * 3600.0, help="rank 0 waits this long for other ranks")
    p.add_argument("--rank", type=int, default=None, help="override RANK / SLURM_PROCID (testing)")
    p.add_argument("--world-size", type=int, default=None, help="override WORLD_SIZE / SLURM_NTASKS (testing)")
    p.add_argument("--no-tensorboard", action="store_true",
                   help="do not write the eval/PROTOCOL/nN/* scalars (to RUN/tb when --out is inside RUN, else OUT/tb)")
    return p


def image_set_metrics(
    folder: Path, prompts: Sequence[str], feature_fn: FeatureFn, ref: tuple[np.ndarray, np.ndarray],
    scorer: ClipScorer | None, args: argparse.Namespace, device: str, protocol: EvalProtocol,
) -> dict:
    files = [image_path(folder, i) for i in range(len(prompts))]
    feats, feat_rate = timed_features(files, feature_fn, device=device, batch=args.feature_batch,
                                      workers=args.workers, description=f"features {folder.name}",
                                      protocol=protocol)
    out = {"fid": fid_from_features(feats, *ref), "feature_images_per_s": feat_rate, "num_images": len(files)}
    if scorer is not None:
        out["clip_score"], out["clip_images_per_s"] = clip_score_files(scorer, files, prompts, args.feature_batch)
    else:
        out["clip_score"] = None
    with Image.open(files[0]) as im:
        out["image_size"] = list(im.size)
    return out


def write_tensorboard(tb_dir: Path, step: int, values: dict[str, float]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tb_dir))
    try:
        for k, v in values.items():
            writer.add_scalar(k, v, step)
    finally:
        writer.close()


# Generation is not batch-invariant: batched matmuls (and convolutions) may sum in another order at another
# batch size, so an image can differ in its last bits, and after uint8 rounding in a few pixels by one
# level. Stated in every metrics.json beside the settings that must match for identical bytes.
REPRODUCIBILITY = ("images (and so FID / CLIP score) are bit-reproducible only at the same --batch, device, "
                   "dtype and library versions (bit_reproducible_at); another --batch can change a few pixels "
                   "by one level (batched-matmul rounding) and the FID in its last digits")


def reproducibility_key(batch: int, device: str, dtype: str) -> dict:
    """The settings that identical image bytes need (``REPRODUCIBILITY``)."""
    import diffusers

    dev = torch.device(device)
    key = {"batch": batch, "device": dev.type, "dtype": dtype, "torch": torch.__version__,
           "diffusers": diffusers.__version__}
    if dev.type == "cuda":  # kernels differ between GPU models
        key["gpu"] = torch.cuda.get_device_name(dev)
    return key


def tensorboard_dir(src: ModelSource, out: Path) -> Path:
    """Where the scalars go: RUN/tb when --out lies inside the model's run (RUN/eval/NAME, what slurm/eval.sh
    and --plot use), else OUT/tb: an evaluation kept elsewhere never lands in the run's curves."""
    run = src.run_dir
    if run is not None and out.resolve().is_relative_to(run.resolve()):
        return run / "tb"
    return out / "tb"


def tensorboard_tags(protocol: str, num_images: int, clip_model: str | None) -> dict[str, str]:
    """Scalar tags by protocol and N (and CLIP model): a curve never joins numbers of different
    protocols, sample counts or CLIP networks. ``{"fid": ..., "clip_score": ...}`` (no CLIP: no tag)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", clip_model) if clip_model else None
    tags = {"fid": f"{protocol}/n{num_images}/fid"}
    if safe:
        tags["clip_score"] = f"{protocol}/n{num_images}/clip_score_{safe}"
    return tags


def protocol_prompts(path: Path, num: int | None, protocol: EvalProtocol) -> list[str]:
    """The first ``num`` prompts, by default the protocol's count (all, with a warning, if fewer)."""
    if num is not None:
        return read_prompts(path, num)
    prompts = read_prompts(path)
    if len(prompts) < protocol.num_images:
        log.warning("--prompts %s has %d prompts; protocol %s uses %d: evaluating all %d (the FID of fewer images "
                    "is biased upwards, not comparable with the published numbers)", path, len(prompts),
                    protocol.name, protocol.num_images, len(prompts))
    return prompts[:protocol.num_images]


def evaluate(args: argparse.Namespace) -> dict | None:
    ri = rank_from_env(args.rank, args.world_size)
    protocol = get_protocol(args.protocol)
    use_cuda = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
    device = f"cuda:{ri.local_rank}" if use_cuda else "cpu"
    # the protocol's generation dtype on GPUs; CPUs have no fast fp16
    dtype = protocol.cuda_dtype if use_cuda else "fp32"
    # Check every input before spending hours generating: a missing weights file should fail now.
    prompts = protocol_prompts(args.prompts, args.num, protocol)
    if args.batch < 1:
        raise ValueError(f"--batch {args.batch}: must be >= 1")
    check_inception_file(args.inception_weights)
    if args.clip_weights is not None:
        check_clip_file(args.clip_model, args.clip_weights)
    if args.ref_stats is not None:
        check_stats_protocol(load_stats(args.ref_stats)[2], protocol, args.ref_stats)
    elif not args.ref_dir.is_dir():
        raise FileNotFoundError(f"--ref-dir {args.ref_dir}: not a directory of reference images")
    args.out.mkdir(parents=True, exist_ok=True)
    src = resolve_model(args.model, args.out, ri.rank)

    sample = one_step_sampler(src.export_dir, device, dtype)
    gen_n, gen_s = generate_images(sample, prompts, args.out / "images", args.batch, ri.rank, ri.world,
                                   protocol.pixel_offset)
    del sample
    teacher_gen = None
    if args.teacher_steps > 0:
        sample = teacher_sampler(src.sampling, device, dtype, args.teacher_steps, args.teacher_cfg)
        teacher_gen = generate_images(sample, prompts, args.out / "teacher_images", args.batch, ri.rank, ri.world,
                                      protocol.pixel_offset)
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
    protocol = get_protocol(args.protocol)
    feature_fn = load_inception(args.inception_weights, device, protocol)
    if args.ref_stats is not None:
        mu, sigma, ref_meta = load_stats(args.ref_stats)
        ref_info = {"ref_stats": str(args.ref_stats.resolve()), **ref_meta}
    else:
        mu, sigma, ref_meta = cached_folder_stats(args.ref_dir, args.out / "ref_stats.npz", args.inception_weights,
                                                  feature_fn, device=device, batch=args.feature_batch,
                                                  workers=args.workers, description="features reference",
                                                  protocol=protocol)
        ref_info = {"ref_dir": str(args.ref_dir.resolve()), **ref_meta}
    scorer = None
    if args.clip_weights is not None:
        from sidscale.eval.clip_score import load_clip

        scorer = load_clip(args.clip_model, args.clip_weights, device, protocol)

    def rate(g: tuple[int, float]) -> float | None:
        return g[0] / g[1] if g[0] and g[1] > 0 else None

    metrics = image_set_metrics(args.out / "images", prompts, feature_fn, (mu, sigma), scorer, args, device, protocol)
    images_seen = src.sampling.get("images_seen")
    metrics.update({
        "step": src.step, "images_seen": images_seen,
        "kimg": images_seen / 1000.0 if images_seen is not None else None,
        "model": str(src.path.resolve()), "model_kind": src.kind, "export_dir": str(src.export_dir.resolve()),
        # images/s of rank 0 over the images it generated in THIS invocation (None when all were on disk)
        "gen_images_per_s": rate(gen), "gen_images_this_run": gen[0], "world_size": world,
        "protocol": {
            **protocol.to_dict(), "fid": protocol.fid_meta(),
            "prompts": str(args.prompts.resolve()), "seed": "image i uses prompt i and seed i",
            "t_init": src.sampling.get("t_init"), "sigma_init": src.sampling.get("sigma_init"),
            "steps": int(src.sampling.get("generator_steps", 1)),
            "family": src.sampling.get("family", "unet_vp"), "teacher_kind": src.sampling.get("teacher_kind"),
            "device": device, "dtype": dtype, "batch": args.batch,
            "pixels": f"uint8(clip(x*127.5+{protocol.pixel_offset:g}, 0, 255))",
            "reference": ref_info, "clip_model": args.clip_model if scorer else None,
            "clip_weights": str(args.clip_weights) if scorer else None,
            "clip_score": "mean cosine similarity (not x100)",
            "reproducibility": REPRODUCIBILITY,
            "bit_reproducible_at": reproducibility_key(args.batch, device, dtype),
        },
    })
    if teacher_gen is not None:
        t = image_set_metrics(args.out / "teacher_images", prompts, feature_fn, (mu, sigma), scorer, args, device,
                              protocol)
        t.update({"steps": args.teacher_steps, "sampler": "ddim" if src.sampling.get("family", "unet_vp")
                  == "unet_vp" else "flow euler", "cfg": args.teacher_cfg, "gen_images_per_s": rate(teacher_gen),
                  "teacher_path": src.sampling.get("teacher_path")})
        t["ddim_steps"] = args.teacher_steps  # the key before flow teachers (kept for older readers)
        metrics["teacher"] = t
    write_tb = src.step is not None and not args.no_tensorboard
    tags = tensorboard_tags(protocol.name, len(prompts), args.clip_model if scorer else None)
    if write_tb:
        tb_dir = tensorboard_dir(src, args.out)
        metrics["tensorboard"] = {"dir": str(tb_dir.resolve()), "tags": [f"eval/{t}" for t in tags.values()]
                                  + ([f"eval_vs_images_seen/{t}" for t in tags.values()] if images_seen is not None
                                     else [])}
    atomic_write_json(args.out / "metrics.json", metrics)
    if write_tb:
        scalars = {tags[k]: metrics[k] for k in tags if metrics[k] is not None}
        write_tensorboard(tb_dir, int(src.step), {f"eval/{k}": v for k, v in scalars.items()})
        if images_seen is not None:
            # TensorBoard steps are integers: the same values against images seen (= 1000 x kimg), the
            # axis that compares runs of different batch sizes
            write_tensorboard(tb_dir, int(images_seen),
                              {f"eval_vs_images_seen/{k}": v for k, v in scalars.items()})
        log.info("TensorBoard scalars %s in %s", ", ".join(metrics["tensorboard"]["tags"]), tb_dir)
    return metrics


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    quiet_third_party()
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--plot" in argv:
        from sidscale.eval.curves import plot_main

        return plot_main(argv)
    args = build_parser().parse_args(argv)
    try:
        metrics = evaluate(args)
    except (EvalWeightsError, ModelDirError, FileNotFoundError, TimeoutError, RefStatsError, ProtocolError) as e:
        # bad input: the message says what is wrong and what is expected; a traceback adds nothing
        print(f"fid_eval: error: {e}", file=sys.stderr)
        return 2
    if metrics is not None:
        summary = {k: metrics[k] for k in ("fid", "clip_score", "num_images", "step")}
        if "teacher" in metrics:
            summary["teacher"] = {k: metrics["teacher"][k] for k in ("fid", "clip_score")}
        print(f"{args.out / 'metrics.json'}: {summary}")
    return 0
