"""Run every sidscale collective once on the real backend: NCCL on GPUs, gloo on CPU.

A CPU test cannot show that NCCL accepts the tensors sidscale hands it (NCCL rejects CPU tensors,
gloo takes anything); this does, in seconds, on whatever GPUs are present:

    torchrun --nproc_per_node $(nvidia-smi -L | wc -l) tools/comm_check.py      # GPUs, NCCL
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tools/comm_check.py          # CPU, gloo

Each check compares the result with the value every rank can compute by itself. Rank 0 prints one
JSON line ({"ok": true, "backend", "world_size", "comm_device", "checks": [...]}); the exit code is
0 only if every rank passed. A failing rank prints its traceback and exits 1 without waiting.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run_checks(device) -> list[str]:
    """The checks, on an initialised process group; raises AssertionError naming the failed one."""
    import torch

    from sidscale.distributed import comm
    from sidscale.distributed.engines import check_identical_across_ranks
    from sidscale.distributed.preemption import StopSignal

    r, w = comm.rank(), comm.world_size()
    done: list[str] = []

    def check(name: str, ok: bool, detail: object = "") -> None:
        assert ok, f"comm_check: {name} failed on rank {r}: {detail}"
        done.append(name)

    check("all_ranks_agree(True)", comm.all_ranks_agree(True))
    check("all_ranks_agree(rank != 0)", comm.all_ranks_agree(r != 0) is False)
    check("any_rank(rank == last)", comm.any_rank(r == w - 1))
    check("any_rank(False)", comm.any_rank(False) is False)
    stop = StopSignal(signals=())
    check("stop_requested (no signal)", stop.stop_requested() is False)
    if r == 0:
        stop.received.append(10)  # as if rank 0 alone got SIGUSR1
    check("stop_requested (signal on rank 0 only)", stop.stop_requested())
    total = comm.all_reduce(torch.tensor([float(r), 1.0]))  # a CPU tensor, as the logging code builds them
    check("all_reduce(cpu tensor)", total.tolist() == [w * (w - 1) / 2, float(w)], total)
    peak = comm.all_reduce(torch.tensor([float(r)], device=device), "max")
    check("all_reduce(device tensor, max)", peak.item() == w - 1, peak)
    check("broadcast_object", comm.broadcast_object({"rank": r}) == {"rank": 0})
    check("decide_on_rank0", comm.decide_on_rank0(lambda: r) == 0)
    check("all_gather_object", comm.all_gather_object(r) == list(range(w)))
    for where in dict.fromkeys([torch.device("cpu"), torch.device(device)]):  # once on CPU runs
        parts = comm.all_gather(torch.full((3,), float(r), device=where))
        check(f"all_gather({torch.device(where).type} tensor)",
              [p.device.type for p in parts] == [torch.device(where).type] * w
              and [p[0].item() for p in parts] == [float(i) for i in range(w)], parts)
    # the EMA's gather to rank 0 (ShardedEMA.gather_to_main sends its fp32 master-partition chunks so)
    for where in dict.fromkeys([torch.device("cpu"), torch.device(device)]):
        got = comm.gather_to_rank0(torch.full((4,), float(r), device=where))
        check(f"gather_to_rank0({torch.device(where).type} tensor)",
              got is None if r != 0 else [p.tolist() for p in got] == [[float(i)] * 4 for i in range(w)], got)
    torch.manual_seed(0)  # the same module on every rank
    module = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 2)).to(device)
    check_identical_across_ranks({"check module": module})
    done.append("check_identical_across_ranks")
    comm.barrier()
    done.append("barrier")
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timeout-s", type=int, default=120, help="process-group timeout (seconds)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    import torch.distributed as tdist

    from sidscale.distributed import comm
    from sidscale.distributed.runtime import fail_fast, init_distributed, shutdown_distributed

    info = init_distributed(args.local_rank, timeout_s=args.timeout_s)
    try:
        done = run_checks(info.device)
    except BaseException as e:  # one rank's failure must not hang the others
        fail_fast(e, info.rank)
    if info.is_main:
        print(json.dumps({"ok": True, "backend": str(tdist.get_backend()), "world_size": info.world_size,
                          "comm_device": str(comm.comm_device()), "checks": done}), flush=True)
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
