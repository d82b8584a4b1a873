"""SiD-LSG distillation on DeepSpeed: the product's main job.

Launch recipes (the run directory holds config.yaml, tb/, samples/, checkpoints/, export/):

    # one node, N processes (GPUs; on CPU: DS_ACCELERATOR=cpu, gloo)
    deepspeed --num_gpus N sidscale/train.py --config sd15 --run-dir runs/sd15 \
        --set teacher.path=/models/sd15 --set data.shards='/data/laion/prompts-{000000..000999}.tar'
    # the same under torchrun
    torchrun --nproc_per_node N sidscale/train.py --config toy --run-dir runs/toy
    # several nodes from a hostfile
    deepspeed --hostfile hosts.txt sidscale/train.py --config sdxl --run-dir /shared/runs/sdxl ...
    # SLURM: one task per GPU started by srun (RANK/WORLD_SIZE come from SLURM_PROCID/SLURM_NTASKS,
    # MASTER_ADDR/MASTER_PORT, unless set, from the first host of the node list and the job id)
    srun --ntasks-per-node 8 python sidscale/train.py --config sdxl --run-dir /shared/runs/$SLURM_JOB_ID

Starting in a directory that has checkpoints resumes from RUN/checkpoints/latest.
``--set resume=false`` refuses to start over an existing run instead.

Exit codes: 0 done, 2 a configuration / run-directory error (nothing trained), 75 stopped by a signal
after saving (SLURM requeues it), 1 a crash (never requeued), 130 interrupted.

The training itself is ``sidscale/trainer.py`` (the loop) over the method's phases (``sidscale/method``);
checkpoints are ``sidscale/checkpointing``.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `deepspeed sidscale/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if __name__ == "__main__":  # before the slow imports: a stop signal during start-up is kept, not fatal
    from sidscale import startup_signals

    startup_signals.install()
    # The imports below build a heap of ~1M module objects (torch, DeepSpeed, ...). With the collector on,
    # CPython runs a full collection each time that heap grows by a quarter: ~1.3 of a toy rank's ~10
    # CPU-seconds of start-up, every one a walk over every object imported so far. Off until they are
    # loaded, then frozen (never scanned again: module objects live as long as the process), so later
    # full collections (lazy imports, DeepSpeed's own gc.collect() calls) walk only the run's objects.
    gc.disable()

from sidscale.checkpointing.manager import (
    check_resumable,
    choose_resume_checkpoint,
    prepare_elastic_resume,
    prepare_run_dir,
)
from sidscale.config import ConfigError, add_config_args, config_from_args, dump_config, validate
from sidscale.distributed import comm
from sidscale.distributed.ds_config import build_ds_config, check_precision_supported
from sidscale.distributed.preemption import EXIT_REQUEUE, StopSignal
from sidscale.distributed.runtime import (
    EXIT_FAILURE,
    StartupError,
    exit_now,
    fail_fast,
    init_distributed,
    shutdown_distributed,
)
from sidscale.errors import CheckpointSaveError
from sidscale.run_lock import RunLock
from sidscale.terminal import quiet_third_party
from sidscale.trainer import Trainer

if __name__ == "__main__":
    gc.freeze()
    gc.enable()

log = logging.getLogger("sidscale.train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--run-dir", required=True, help="run directory (created; resumed when it has checkpoints)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_third_party()
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"sidscale: config error: {e}", file=sys.stderr)
        return 2
    stop = StopSignal()  # installed before the slow start-up so an early signal is not lost
    run_lock = RunLock(Path(args.run_dir).expanduser())  # rank 0 takes it in prepare_run_dir
    try:
        dist_info = init_distributed(args.local_rank, timeout_s=cfg.dist.timeout_s)
    except StartupError as e:  # an old DeepSpeed, no usable GPU
        print(f"sidscale: error: {e}", file=sys.stderr)
        return 2
    rank = dist_info.rank
    try:
        validate(cfg, dist_info.world_size)
        build_ds_config(cfg, dist_info.world_size)  # a bad ds_config fails here, before any model loads
        check_precision_supported(cfg.train.precision)
        run_dir = Path(args.run_dir).expanduser()
        decision: tuple[bool, str | None] = (False, None)
        if dist_info.is_main:
            try:
                decision = (prepare_run_dir(run_dir, cfg.resume, run_lock), None)
                if decision[0]:
                    check_resumable(run_dir, cfg, dist_info.world_size)
            except ConfigError as e:
                decision = (False, str(e))
        has_checkpoint, error = comm.broadcast_object(decision)
        if error:
            raise ConfigError(error)
        universal, written_by = None, dist_info.world_size
        if has_checkpoint:  # verified by every rank before any model is built
            path = choose_resume_checkpoint(run_dir, rank, dist_info.world_size)
            written_by, universal = prepare_elastic_resume(path, dist_info.world_size)
        trainer = Trainer(cfg, run_dir, dist_info, load_universal=universal is not None)
        if has_checkpoint:
            trainer.resume(path, universal)
            if dist_info.is_main:
                via = f", written by {written_by} ranks, resharded for {dist_info.world_size}" if universal else ""
                print(f"sidscale: resumed from {path} (step {trainer.step}{via})", flush=True)
        if not comm.all_ranks_agree(True):
            raise RuntimeError("a rank failed during start-up")
        if universal is not None:  # every rank has loaded it; deleting a big model's copy takes a while
            from sidscale.checkpointing.elastic import remove_universal

            comm.broadcast_object_after_long_work(lambda: remove_universal(path, written_by),
                                                  what="removing the universal copy of the checkpoint")
        if dist_info.is_main:  # the run has started: only now does the directory hold its config
            dump_config(cfg, run_dir / "config.yaml")
        code = 0 if trainer.run(stop) else EXIT_REQUEUE
        if code == EXIT_REQUEUE:  # per rank: a multi-node job's logs show every node stopped at the same step
            print(f"sidscale: rank {rank} stops at step {trainer.step} (exit {code}, requeue)", flush=True)
    except ConfigError as e:
        # Printed by every rank that has one: most are the same everywhere (same config, decisions
        # broadcast from rank 0), but a teacher file missing on one node's view of a shared filesystem
        # is seen by that node's ranks only, and would otherwise end the job without a word.
        print(f"{'' if dist_info.is_main else f'[rank {rank}] '}sidscale: error: {e}", file=sys.stderr, flush=True)
        exit_now(2)
    except CheckpointSaveError as e:
        print(f"sidscale: error: {e}", file=sys.stderr, flush=True)
        exit_now(EXIT_FAILURE)  # other ranks may be blocked in a collective of the failed save
    except BaseException as e:  # anything else, on any rank, KeyboardInterrupt included
        # NOTE: never the barrier of shutdown_distributed here: the other ranks are blocked in a
        # collective this rank will not join, so it would hang the whole job (until the NCCL
        # watchdog, 10+ minutes of every GPU). Print, then leave at once; the peers' collectives
        # fail when this process's connections close, or at dist.timeout_s, and launchers
        # (torchrun, srun --wait in slurm/distill.sh) end the rest. Exit 1, never 75: SLURM must
        # not requeue a crash.
        fail_fast(e, rank, 130 if isinstance(e, KeyboardInterrupt) else EXIT_FAILURE)
    # Clean end or requeue stop: every rank gets here after the same step.
    shutdown_distributed()
    run_lock.release()
    return code


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
