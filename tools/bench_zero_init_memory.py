"""Host memory of building the generator and fake engines under ZeRO-3: the copy build vs zero.Init.

    DS_ACCELERATOR=cpu python tools/bench_zero_init_memory.py            # 1 and 2 ranks, both builds
    DS_ACCELERATOR=cpu python tools/bench_zero_init_memory.py --worlds 2 --builds zero_init

Each case starts ``world`` fresh processes (one per rank, gloo) so every rank's peak resident set
(``VmHWM`` in /proc/self/status, which counts torch's allocations like any other) is its own. A rank:

1. builds the frozen teacher: SD1.5's UNet topology at 2.5x ``mid``'s width ([128, 256, 512, 512],
   cross-attention 512: 139.7 M parameters), random weights, in bf16 (``teacher.dtype``);
2. builds the generator and the fake engine with ``sidscale.distributed.engines.build_engine``
   (ds_configs/zero3.json, bf16, torch Adam) by the copy build (``copy.deepcopy(teacher).float()``,
   then DeepSpeed partitions) or the ``deepspeed.zero.Init`` build (``sidscale.distributed.zero_init``);
3. partitions the teacher (``teacher.partitioned``: ``sidscale.distributed.teacher_partition``).

Reported per rank, in MiB, for each phase: how far the peak resident set rose above the resident set
before the phase, and how much stayed resident after it (glibc's freed heap is returned with
``malloc_trim`` before each reading, and the peak is reset between phases by writing 5 to
/proc/self/clear_refs), next to the memory plan's terms for the same network.
Results: bench/results/cpu_zero_init_memory_<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20
UNET_WIDTHS = [128, 256, 512, 512]
CROSS_ATTENTION = 512


def status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(line.split()[1]) * 1024
    return out


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def build_teacher(device: str = "cpu"):
    """The benchmark's frozen bf16 teacher, made in bf16 directly (no fp32 copy first: the host memory
    at start is the teacher's own); random N(0, 0.02) weights. ``device="meta"``: shapes only."""
    import torch
    from diffusers import UNet2DConditionModel

    from sidscale.families.unet_vp.presets import arch_preset

    cfg = {**arch_preset("mid").unet, "block_out_channels": UNET_WIDTHS, "cross_attention_dim": CROSS_ATTENTION}
    with torch.device("meta"):
        net = UNet2DConditionModel(**cfg).to(torch.bfloat16)
    if device != "meta":
        net = net.to_empty(device=device)
        g = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0.0, 0.02, generator=g)
    return net.requires_grad_(False).eval()


def trim() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise), so VmRSS is the live memory."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def worker(args: argparse.Namespace) -> None:
    os.environ.update(RANK=str(args.rank), LOCAL_RANK=str(args.rank), WORLD_SIZE=str(args.world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), DS_ACCELERATOR="cpu")
    import torch

    torch.set_num_threads(1)
    from sidscale.config import NetConfig
    from sidscale.distributed.engines import build_engine
    from sidscale.distributed.runtime import init_distributed
    from sidscale.distributed.teacher_partition import partition_teacher

    init_distributed()
    build_teacher("meta")  # import diffusers' modules before the first reading: their RSS is not the teacher's
    phases: dict[str, dict[str, int]] = {}
    can_reset = reset_peak()
    phases["start"] = status()

    def phase(name: str, fn):
        trim()
        phases[f"before_{name}"] = status()
        reset_peak()
        t0 = time.perf_counter()
        out = fn()
        peak = status()["VmHWM"]
        trim()
        phases[name] = {**status(), "VmHWM": peak, "seconds": round(time.perf_counter() - t0, 2)}
        return out

    teacher = phase("teacher", build_teacher)
    if args.build == "copy":
        # what the copy build holds on every rank before DeepSpeed partitions anything (then dropped)
        phase("fp32_copy", lambda: copy.deepcopy(teacher).float() and None)
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds.update(train_batch_size=args.world, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1,
              bf16={"enabled": True})
    engines = []
    for name in ("generator", "fake"):
        engines.append(phase(name, lambda: build_engine(teacher, NetConfig(), ds, construct=args.build)))
    phase("teacher_partitioned", lambda: partition_teacher(teacher, ds, "bf16"))
    params = sum(int(getattr(p, "ds_numel", p.numel())) for p in teacher.parameters())
    Path(args.out).write_text(json.dumps({"rank": args.rank, "phases": phases, "teacher_params": params,
                                          "peak_reset_supported": can_reset}))
    from sidscale.distributed import comm

    comm.barrier()


def run_case(world: int, build: str, out_dir: Path) -> list[dict]:
    from sidscale.distributed.runtime import free_port

    port = free_port()
    # NOTE: a fixed mmap threshold: glibc otherwise raises it after each large free, serves the next
    # tensors from the heap and cannot give that memory back, so VmRSS would count freed tensors
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(REPO), MALLOC_MMAP_THRESHOLD_="131072")
    outs = [out_dir / f"{build}_w{world}_r{r}.json" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--rank", str(r), "--world", str(world),
                               "--port", str(port), "--build", build, "--out", str(outs[r])], env=env)
             for r in range(world)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"bench_zero_init_memory: {build} on {world} rank(s) failed (exit codes {codes})")
    return [json.loads(o.read_text()) for o in outs]


def predicted(world: int, build: str) -> dict[str, float]:
    """The memory plan's terms for this network (MiB; no text encoders in this benchmark)."""
    from sidscale.perf.memory_plan import PlanInput, construction_terms, static_terms
    from sidscale.perf.zero_terms import counts_of, zero_init_module_transient

    counts = counts_of(build_teacher("meta"), 100_000)
    inp = PlanInput("(bench)", gpus=world, zero=3, precision="bf16", teacher_dtype="bf16")
    zs = json.loads((REPO / "ds_configs" / "zero3.json").read_text())["zero_optimization"]
    terms, *_ = static_terms(inp, counts.params, 0, counts.buffers, counts.largest_module, 0, zs)
    cons = construction_terms(counts, 0, inp, terms, zero_init=build == "zero_init")
    # what exists right after deepspeed.initialize: torch Adam's states and ZeRO-3's reduction bucket
    # are allocated at the first step
    at_start = sum(terms[f"generator_{k}"] for k in ("params", "fp32_master", "grads"))
    # what this benchmark measures while a net is built: the copy build's fp32 copy, or zero.Init's module
    transient = cons.get("fake_fp32_copy", zero_init_module_transient(counts, "bf16"))
    from sidscale.distributed.teacher_partition import teacher_ds_config
    from sidscale.perf.zero_terms import teacher_terms

    zt = teacher_ds_config({"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1,
                            "gradient_accumulation_steps": 1, "zero_optimization": zs}, "bf16")["zero_optimization"]
    partitioned = sum(teacher_terms(counts, 2, world, True, zt)[0].values())
    return {"engine_at_start_mib": at_start / MIB, "engine_with_optimizer_mib":
            sum(v for k, v in terms.items() if k.startswith("generator")) / MIB,
            "build_transient_mib": transient / MIB, "construction_terms_mib": {k: v / MIB for k, v in cons.items()},
            "teacher_mib": 2 * counts.params / MIB, "teacher_partition_mib": partitioned / MIB}


def summarise(results: dict, worlds: list[int], builds: list[str]) -> tuple[dict, str]:
    rows = []
    lines = ["| build | ranks | teacher resident | full fp32 copy (copy build, before partitioning) "
             "| G: peak / resident | F: peak / resident "
             "| plan: engine at start (bf16 params + fp32 master + fp32 grads, /N) | plan: build transient "
             "| teacher partitioned: RSS drop (plan: its 1 - 1/N, small tensors stay whole) | seconds G+F |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for build in builds:
        for world in worlds:
            ranks = results[(build, world)]
            r = max(ranks, key=lambda x: x["phases"]["fake"]["VmHWM"])  # the rank with the highest peak
            ph = {k: {m: v / MIB if m != "seconds" else v for m, v in d.items()} for k, d in r["phases"].items()}
            pred = predicted(world, build)

            def grew(name: str, ph=ph) -> tuple[float, float]:  # (peak, resident) above the RSS before the phase
                base = ph[f"before_{name}"]["VmRSS"]
                return ph[name]["VmHWM"] - base, ph[name]["VmRSS"] - base

            teacher = grew("teacher")[1]
            g_peak, g_res = grew("generator")
            f_peak, f_res = grew("fake")
            drop = -grew("teacher_partitioned")[1]
            fp32_copy = grew("fp32_copy")[0] if "fp32_copy" in ph else 0.0
            row = {"build": build, "world": world, "params": r["teacher_params"], "teacher_resident_mib": teacher,
                   "fp32_copy_peak_mib": fp32_copy,
                   "generator_peak_mib": g_peak, "generator_resident_mib": g_res, "fake_peak_mib": f_peak,
                   "fake_resident_mib": f_res, "teacher_partition_rss_drop_mib": drop,
                   "seconds_engines": ph["generator"]["seconds"] + ph["fake"]["seconds"],
                   "peak_reset_supported": r["peak_reset_supported"], "per_rank": ranks, "plan": pred}
            rows.append(row)
            lines.append(
                f"| {build} | {world} | {teacher:.0f} | {fp32_copy:.0f} | {g_peak:.0f} / {g_res:.0f} "
                f"| {f_peak:.0f} / {f_res:.0f} | "
                f"{pred['engine_at_start_mib']:.0f} | {pred['build_transient_mib']:.0f} | {drop:.0f} "
                f"({pred['teacher_mib'] - pred['teacher_partition_mib']:.0f}) | {row['seconds_engines']:.1f} |")
    return {"rows": rows}, "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--builds", nargs="+", default=["copy", "zero_init"], choices=["copy", "zero_init"])
    p.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--build", default="zero_init", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = out_dir / ".zero_init_memory_ranks"
    scratch.mkdir(exist_ok=True)
    results = {(b, w): run_case(w, b, scratch) for b in args.builds for w in args.worlds}
    for f in scratch.glob("*.json"):
        f.unlink()
    scratch.rmdir()
    data, table = summarise(results, args.worlds, args.builds)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    hardware = f"{os.cpu_count()}-core CPU ({cpu}), {ram:.0f} GiB RAM, shared with other jobs"
    data.update(hardware=hardware, date=datetime.date.today().isoformat(), units="MiB",
                method="VmRSS / VmHWM of /proc/self/status per rank process (peak reset per phase via clear_refs)")
    stem = f"cpu_zero_init_memory_{datetime.date.today().isoformat()}"
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=1))
    md = (f"# Host memory of building G and fake under ZeRO-3: copy build vs zero.Init\n\n"
          f"Hardware: {hardware} (more ranks than cores run oversubscribed: the seconds are not speeds, the "
          f"memory is per process). Network: SD1.5 UNet topology, widths {UNET_WIDTHS}, "
          f"{data['rows'][0]['params'] / 1e6:.1f} M parameters; teacher bf16, training bf16, "
          f"ds_configs/zero3.json, torch Adam. MiB per rank (the rank with the highest peak). "
          f"Made by tools/bench_zero_init_memory.py.\n\n{table}\n")
    (out_dir / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
