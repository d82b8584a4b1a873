"""Predicted cost of SiD training as the cluster grows, and the memory plan of the big presets. PREDICTIONS.

    python tools/scaling_model.py                          # scaling table: SD1.5, SDXL, SD3.5-Large, FLUX.1-dev
    python tools/scaling_model.py --presets sdxl --gpus 8 16 32 --inter-gbps 25 --mfu 0.3 --json
    python tools/scaling_model.py --memory                 # SD3.5-Large and FLUX.1-dev on 8 and 16 x 80 GB
    python tools/scaling_model.py --bytes --presets sd35_large --gpus 64   # bytes per collective class

The model (bytes per ZeRO stage per iteration, ring costs, FLOPs, overlap) is sidscale/bench/scaling.py; its
byte counts are checked against a real 2-rank run in tests/unit/test_scaling.py. The memory plan is
sidscale/perf/memory_plan.py. Each preset trains with its config preset's recipe (global batch, micro-batch,
checkpointing, generator steps, CFG); the micro-batch is lowered when the global batch has fewer samples than
GPUs x micro-batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The (ZeRO stage, partitioned teacher) settings each preset is tabled with: the cheapest that fit 8 x 80 GB in
# the memory table (``--memory``; SD3.5-Large also with ZeRO-3 engines, FLUX only fits with both sharded).
# FLUX.1-dev with ZeRO-2 engines fits from 32 GPUs on (their 16-bit weights stay whole on every GPU).
PLACEMENTS = {"sd15": [(2, False)], "sdxl": [(2, False)], "sd35_large": [(2, True), (3, False)],
              "flux_dev": [(3, True), (2, True)]}


def recipe(preset: str) -> dict:
    """Global batch, micro-batch, checkpointing, generator steps and CFG scales of the preset's config."""
    from sidscale.config import load_config
    from sidscale.families.presets import preset_nets

    cfg = load_config(preset_nets(preset).config_preset(preset))
    m = cfg.method
    return {"global_batch": cfg.train.global_batch, "micro_batch": cfg.train.micro_batch,
            "generator_steps": m.generator_steps, "cfg_scales": (m.cfg_train_fake, m.cfg_eval_fake, m.cfg_eval_real),
            "grad_checkpointing": bool(cfg.generator.grad_checkpointing)}


def base_setups(preset: str, args: argparse.Namespace) -> list:
    """The preset's recipe under each of its placements (or the --zero / --teacher-partitioned one)."""
    from sidscale.bench.scaling import Setup

    r = recipe(preset)
    placements = PLACEMENTS.get(preset, [(2, False)])
    if args.zero is not None or args.teacher_partitioned:
        placements = [(args.zero or placements[0][0], args.teacher_partitioned)]
    return [Setup(zero=zero, micro_batch=args.micro_batch or r["micro_batch"], global_batch=r["global_batch"],
                 grad_checkpointing=r["grad_checkpointing"], teacher_partitioned=partitioned,
                 generator_steps=r["generator_steps"],
                 cfg_scales=tuple(r["cfg_scales"]),
                 gpus_per_node=args.gpus_per_node, intra_gbps=args.intra_gbps, inter_gbps=args.inter_gbps,
                 peak_tflops=args.peak_tflops, mfu=args.mfu, overlap=args.overlap, ckpt_every=args.ckpt_every,
                 preview_every=args.preview_every, storage_gbps_per_node=args.storage_gbps)
            for zero, partitioned in placements]


def scaling_table(args: argparse.Namespace) -> list[dict]:
    from sidscale.bench.scaling import iteration_cost, preset_profile

    rows = []
    for preset in args.presets:
        profile = preset_profile(preset)
        for base in base_setups(preset, args):
            first = None
            for g in args.gpus:
                rows.append(row := _scaling_row(preset, profile, base, g, iteration_cost))
                if not args.no_memory_check:
                    row["fits"] = fits(preset, row, args.gpu_mem_gib)
                first = first or row
                row["efficiency_vs_first"] = row["samples_per_s_per_gpu"] / first["samples_per_s_per_gpu"]
    return rows


def fits(preset: str, row: dict, gpu_mem_gib: float) -> str:
    """Whether the memory plan fits the row's setting (previews off): "yes", "text enc. off" or "no"."""
    from sidscale.perf.memory_plan import PlanInput, budget_bytes, plan

    for text, answer in (("replicated", "yes"), ("off", "text enc. off")):
        inp = PlanInput(preset, row["gpus"], row["zero"], row["micro_batch"], "bf16", None, row["grad_checkpointing"],
                        gpu_mem_gib, cfg_scales=tuple(row["cfg_scales"]),
                        teacher_partitioned=row["teacher_partitioned"], text_encoders=text, previews=False)
        if plan(inp, micro_batch=row["micro_batch"]).total <= budget_bytes(gpu_mem_gib):
            return answer
    return "no"


def _scaling_row(preset: str, profile, base, g: int, iteration_cost) -> dict:
    gb = base.global_batch or g * base.micro_batch
    mb = max(1, min(base.micro_batch, gb // g))  # the recipe's global batch, when it has fewer samples than GPUs x mb
    cost = iteration_cost(profile, dataclasses.replace(base, gpus=g, micro_batch=mb))
    s = cost.setup
    return {"preset": preset, "gpus": g, "zero": s.zero, "teacher_partitioned": s.teacher_partitioned,
            "grad_checkpointing": s.grad_checkpointing, "micro_batch": mb, "accumulation": s.accumulation,
            "cfg_scales": list(s.cfg_scales), "generator_steps": s.generator_steps,
            "samples_per_iter": s.samples_per_iter, "compute_s": cost.compute_s,
            "comm_overlappable_s": cost.comm_overlappable_s, "comm_serial_s": cost.comm_serial_s,
            "step_s": cost.step_s, "samples_per_s": cost.samples_per_s,
            "samples_per_s_per_gpu": cost.samples_per_s / g,
            "wire_gb_per_rank": sum(o.wire_bytes for o in cost.ops.values()) / 1e9,
            "msg_gb_by_class": {k: o.msg_bytes / 1e9 for k, o in cost.ops.items()}}


def assumptions(args: argparse.Namespace) -> str:
    return (f"PREDICTIONS (sidscale/bench/scaling.py), not measurements: {args.peak_tflops:g} TFLOP/s peak x MFU "
            f"{args.mfu:g}; ring collectives at {args.intra_gbps:g} GB/s per GPU inside a node of "
            f"{args.gpus_per_node} GPUs and {args.inter_gbps:g} GB/s per GPU across nodes; overlap {args.overlap:g}; "
            f"checkpoint every {args.ckpt_every} iterations at {args.storage_gbps:g} GB/s per node; "
            "ZeRO-3 gathers without parameter reuse (an upper bound); no latency term. 'fits': the memory plan at "
            "this micro-batch, previews off, within the budget (90 % of the card less a 2 GiB reserve outside the "
            "allocator; yes / only with the text encoders off the GPU / no).")


def scaling_markdown(rows: list[dict], args: argparse.Namespace) -> str:
    out = [assumptions(args), "",
           "| preset | setting | GPUs | micro x accum | fits 80 GB | compute s | comm s (overlappable / serial) "
           "| step s | samples/s | samples/s/GPU | vs first |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        setting = (f"ZeRO-{r['zero']}" + (", teacher ZeRO-3" if r["teacher_partitioned"] else "")
                   + (", ckpt" if r["grad_checkpointing"] else ""))
        name = r["preset"]
        out.append(f"| {name} | {setting} | {r['gpus']} | {r['micro_batch']} x {r['accumulation']} "
                   f"| {r.get('fits', '-')} | {r['compute_s']:.2f} "
                   f"| {r['comm_overlappable_s']:.2f} / {r['comm_serial_s']:.3f} "
                   f"| {r['step_s']:.2f} | {r['samples_per_s']:.1f} | {r['samples_per_s_per_gpu']:.2f} "
                   f"| {r['efficiency_vs_first']:.2f} |")
    return "\n".join(out)


# Memory table: every combination, in the order a run should prefer them (cheapest first): no checkpointing
# before checkpointing (+1 forward per backward), ZeRO-2 before ZeRO-3 (gathers), a replicated teacher before a
# partitioned one (its gathers), text encoders replicated, then off the GPU (precomputed: no cost in training),
# then partitioned (gathers). The first that fits at micro-batch >= 1 is the recommendation.
def memory_candidates() -> list[tuple[bool, int, bool, str]]:
    out = []
    for ckpt in (False, True):
        for zero in (2, 3):
            for partitioned in (False, True):
                for text in ("replicated", "off", "partitioned"):
                    out.append((ckpt, zero, partitioned, text))
    return out


def memory_table(args: argparse.Namespace) -> list[dict]:
    from sidscale.perf.memory_plan import GIB, PlanInput, plan

    rows = []
    for preset in args.memory_presets:
        r = recipe(preset)
        for ckpt, zero, partitioned, text in memory_candidates():
            row = {"preset": preset, "grad_checkpointing": ckpt, "zero": zero, "teacher_partitioned": partitioned,
                   "text_encoders": text}
            for g in args.memory_gpus:
                for previews in (True, False):
                    res = plan(PlanInput(preset, g, zero, 1, "bf16", None, ckpt, args.gpu_mem_gib,
                                         cfg_scales=tuple(r["cfg_scales"]), teacher_partitioned=partitioned,
                                         text_encoders=text, previews=previews))
                    tag = "" if previews else "_nopreview"
                    row[f"gib_mb1_{g}{tag}"] = res.total / GIB
                    row[f"peak_phase_{g}{tag}"] = res.peak_phase
                    row[f"max_mb_{g}{tag}"] = res.max_micro_batch
            rows.append(row)
    for preset in args.memory_presets:
        for g in args.memory_gpus:
            for tag in ("", "_nopreview"):
                fits = [x for x in rows if x["preset"] == preset and x[f"max_mb_{g}{tag}"] >= 1]
                if fits:
                    fits[0][f"recommended_{g}{tag}"] = True
    return rows


def memory_markdown(rows: list[dict], args: argparse.Namespace) -> str:
    g1, g2 = args.memory_gpus[0], args.memory_gpus[-1]
    out = [f"PREDICTIONS (sidscale/perf/memory_plan.py) per GPU of {args.gpu_mem_gib:g} GiB at 1024 px, bf16, the "
           "preset's CFG. GiB: the predicted peak at micro-batch 1 with previews (ZeRO-2: rank 0 builds the whole "
           "bf16 preview network; ZeRO-3: the EMA is swapped into the partitioned generator) / without "
           "(eval.preview_every=0, no toy evaluation); largest micro-batch that fits, "
           "with / without previews; * = recommended (the cheapest setting that fits, order in "
           "tools/scaling_model.py). Fits = within the budget: 90 % of the card less a 2 GiB reserve outside "
           "PyTorch's allocator (sidscale/perf/memory_plan.py: budget_bytes), i.e. >= 10 % of the card left free.",
           "",
           f"| preset | ckpt | ZeRO | teacher | text encoders | GiB at mb 1, {g1} GPUs | largest mb, {g1} GPUs "
           f"| GiB at mb 1, {g2} GPUs | largest mb, {g2} GPUs |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not args.all and not r["grad_checkpointing"] and not any(
                r.get(f"recommended_{g}{t}") for g in (g1, g2) for t in ("", "_nopreview")):
            if not (r["zero"] == 3 and r["teacher_partitioned"] and r["text_encoders"] == "off"):
                continue  # without checkpointing only the most sharded row (it shows activations alone overflow)
        name = r["preset"]

        def mb(g: int, r: dict = r) -> str:
            return " / ".join(f"{r[f'max_mb_{g}{t}']}{'*' if r.get(f'recommended_{g}{t}') else ''}"
                              for t in ("", "_nopreview"))

        def gib(g: int, r: dict = r) -> str:
            return f"{r[f'gib_mb1_{g}']:.1f} / {r[f'gib_mb1_{g}_nopreview']:.1f}"

        out.append(f"| {name} | {'on' if r['grad_checkpointing'] else 'off'} | {r['zero']} "
                   f"| {'ZeRO-3' if r['teacher_partitioned'] else 'replicated'} | {r['text_encoders']} "
                   f"| {gib(g1)} | {mb(g1)} | {gib(g2)} | {mb(g2)} |")
    return "\n".join(out)


def bytes_table(args: argparse.Namespace) -> str:
    from sidscale.bench.scaling import iteration_cost, preset_profile

    out = ["| preset | setting | GPUs | class | collective | GB per rank (logged) | GB on the wire per rank |",
           "|---|---|---|---|---|---|---|"]
    for preset in args.presets:
        profile = preset_profile(preset)
        for base in base_setups(preset, args):
            for g in args.gpus:
                mb = max(1, min(base.micro_batch, (base.global_batch or g) // g))
                cost = iteration_cost(profile, dataclasses.replace(base, gpus=g, micro_batch=mb))
                for name, op in cost.ops.items():
                    out.append(f"| {preset} | ZeRO-{base.zero}{', teacher ZeRO-3' if base.teacher_partitioned else ''} "
                               f"| {g} | {name} | {op.op} | {op.msg_bytes / 1e9:.3f} | {op.wire_bytes / 1e9:.3f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["sd15", "sdxl", "sd35_large", "flux_dev"])
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 256])
    p.add_argument("--zero", type=int, choices=[1, 2, 3], default=None, help="default: per preset (DEFAULT_PLACEMENT)")
    p.add_argument("--teacher-partitioned", action="store_true", help="default: per preset (FLUX: partitioned)")
    p.add_argument("--micro-batch", type=int, default=None, help="default: the preset's config")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--intra-gbps", type=float, default=300.0, help="GB/s per GPU inside a node (ring bus bandwidth)")
    p.add_argument("--inter-gbps", type=float, default=40.0, help="GB/s per GPU across nodes")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100 SXM: 989)")
    p.add_argument("--mfu", type=float, default=0.35)
    p.add_argument("--overlap", type=float, default=1.0)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--preview-every", type=int, default=500)
    p.add_argument("--storage-gbps", type=float, default=5.0, help="checkpoint write GB/s per node")
    p.add_argument("--memory", action="store_true", help="the memory table of the big presets instead")
    p.add_argument("--memory-presets", nargs="+", default=["sd35_large", "flux_dev"])
    p.add_argument("--memory-gpus", type=int, nargs=2, default=[8, 16])
    p.add_argument("--gpu-mem-gib", type=float, default=80.0)
    p.add_argument("--all", action="store_true", help="--memory: every combination, also without checkpointing")
    p.add_argument("--bytes", action="store_true", help="bytes per collective class instead")
    p.add_argument("--json", action="store_true", help="JSON lines instead of markdown")
    p.add_argument("--no-memory-check", action="store_true", help="scaling table: skip the memory plan's fit column")
    args = p.parse_args(argv)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    if args.bytes:
        print(bytes_table(args))
        return 0
    rows = memory_table(args) if args.memory else scaling_table(args)
    if args.json:
        for r in rows:
            print(json.dumps(r, sort_keys=True))
    else:
        print(memory_markdown(rows, args) if args.memory else scaling_markdown(rows, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
