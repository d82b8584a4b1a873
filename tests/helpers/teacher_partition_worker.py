"""One rank of the 2-rank checks of tests/trainer/test_teacher_partition.py (started by ``run_two_ranks``).

Each rank builds, in one process, two real ``Trainer``s on the tiny SD3.5 teacher (ZeRO-3, fp32), one
with ``teacher.partitioned=true`` and one with ``false``, runs the generator step's forward and
backward exactly as ``Trainer.train_step`` does, and saves what the test compares: the loss, every
full generator gradient, the teacher's partition sizes, how much of the teacher was ever gathered
at once. Then, for the ``deepspeed.zero.Init`` build: the generator's gathered weights right after
construction, and two optimizer steps of a copy-built and a zero.Init-built engine (fp32 and bf16).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch

# Gather settings that make the tiny teacher really partitioned while it runs (the defaults would
# prefetch and keep its 0.8 M parameters whole: sidscale.distributed.teacher_partition).
WORLD_SIZE = 2
SMALL_GATHERS = {"stage3_prefetch_bucket_size": 0, "stage3_param_persistence_threshold": 0,
                 "stage3_max_live_parameters": 0, "stage3_max_reuse_distance": 0}


def write_ds_config(path: Path) -> Path:
    ds = json.loads((Path(__file__).resolve().parents[2] / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"].update(SMALL_GATHERS)
    path.write_text(json.dumps(ds))
    return path


def overrides(teacher_dir: Path, ds_config: Path, partitioned: str, run_dir: Path) -> list[str]:
    """The SD3.5-Medium recipe (CFG 4.5 on teacher and fake, flow schedule) on the tiny SD3.5 teacher."""
    return [f"teacher.path={teacher_dir}", "teacher.dtype=fp32", "teacher.resolution=64",
            "teacher.max_sequence_length=16", "train.precision=fp32", "train.global_batch=2", "train.micro_batch=1",
            "generator.lr=1e-3", "fake.lr=1e-3", "data.shards=indexed:toy", "eval.num_samples=0", "train.seed=11",
            f"deepspeed.config={ds_config}", f"teacher.partitioned={partitioned}", f"teacher.cache_dir={run_dir}"]


def generator_gradients(trainer, detach_teacher: bool = False) -> dict:
    """The generator step of ``Trainer.train_step`` (first micro-batch) up to the backward; full grads."""
    from deepspeed.utils import safe_get_full_grad

    from sidscale.core.noise import PHASE_GEN
    from sidscale.distributed.teacher_partition import GatherProbe
    from sidscale.method.sid_lsg import generator_step

    teacher_fn = trainer.fns.teacher_fn
    if detach_teacher:  # the control: what a detached teacher output would give
        def teacher_fn(x, t, c, f=trainer.fns.teacher_fn):
            return f(x, t, c).detach()
    probe = GatherProbe(trainer.teacher.net) if trainer.teacher_engine is not None else None
    noise, cond, uncond, _ = trainer.batch(PHASE_GEN, 0)
    trainer.fake_engine.module.requires_grad_(False)
    loss, _ = generator_step(trainer.fns.gen_engine_fn, trainer.fns.fake_module_fn, teacher_fn, trainer.schedule,
                             noise, cond, uncond, trainer.settings, loss_normaliser=trainer.micro, k=1)
    trainer.gen_engine.backward(loss)
    trainer.fake_engine.module.requires_grad_(True)
    grads = {n: safe_get_full_grad(p).detach().clone() for n, p in trainer.gen_engine.module.named_parameters()}
    out = {"loss": loss.detach().clone(), "grads": grads}
    if probe is not None:
        out["gathered_max"] = probe.peak
        out["gathered_names"] = probe.peak_names
        out["gathered_after"] = probe.now()
        probe.remove()
    trainer.gen_engine.optimizer.zero_grad()
    return out


def gathered_weights(module: torch.nn.Module) -> dict:
    import deepspeed

    out = {}
    for n, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[n] = p.detach().clone()
    return out


def two_steps(teacher_net: torch.nn.Module, construct: str, precision: str, ds_config: dict, cond: dict,
              family, schedule, latent_shape: tuple) -> dict:
    """Two Adam steps of a generator engine built by ``construct`` on a fixed regression loss."""
    from sidscale.config import NetConfig
    from sidscale.distributed.engines import build_engine

    ds = json.loads(json.dumps(ds_config))
    ds["bf16"] = {"enabled": precision == "bf16"}
    # NOTE: zero.Init with memory_efficient_linear (DeepSpeed's default) replaces
    # torch.nn.functional.linear process-wide by LinearFunctionForZeroStage3 and never restores it,
    # and the two builds enter it differently (Init(module=...) vs the context): pin the function both
    # train with, so the comparison is between the builds' weights and layouts only.
    linear = torch.nn.functional.linear
    engine = build_engine(teacher_net, NetConfig(lr=1e-2, eps=1.0), ds, construct=construct)
    torch.nn.functional.linear = linear
    g = torch.Generator().manual_seed(100 + int(os.environ["RANK"]))
    x = torch.randn(2, *latent_shape, generator=g)
    t = schedule.level_tensor(0.7, 2, "cpu")
    pred = family.prediction_fn(engine, schedule)
    for _ in range(2):
        loss = (pred(x, t, cond) - x).square().mean()
        engine.backward(loss)
        engine.step()
    masters = [f.detach().clone() for f in engine.optimizer.fp32_partitioned_groups_flat]
    buffers = {n: b.detach().clone() for n, b in engine.module.named_buffers()}
    return {"weights": gathered_weights(engine.module), "masters": masters, "buffers": buffers}


def main(rank: int, world: int, port: str, teacher_dir: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    out = Path(out_dir)
    try:
        from sidscale.config import load_config
        from sidscale.distributed.runtime import init_distributed, shutdown_distributed
        from sidscale.trainer import Trainer

        info = init_distributed()
        ds_path = write_ds_config(out / f"zero3_small_{rank}.json")
        result: dict = {}
        trainers = {}
        for placement in ("true", "false"):
            run = out / f"run_{placement}_{rank}"
            cfg = load_config("sd35_medium", overrides(Path(teacher_dir), ds_path, placement, run))
            trainers[placement] = Trainer(cfg, run, info)
        part, repl = trainers["true"], trainers["false"]
        teacher = repl.teacher.net
        result["teacher_full"] = {n: p.detach().clone() for n, p in teacher.named_parameters()}
        result["placement"] = {k: t.teacher_placement.partitioned for k, t in trainers.items()}
        result["teacher_partition_numel"] = sum(p.ds_tensor.numel() for p in part.teacher.net.parameters())
        result["teacher_numel"] = sum(p.ds_numel for p in part.teacher.net.parameters())
        result["teacher_is_module"] = part.teacher_engine.module is part.teacher.net
        # the memory plan's prediction of the gathered layers, from the real network and ds_config
        from sidscale.distributed.teacher_partition import teacher_ds_config
        from sidscale.perf.zero_terms import counts_of, teacher_terms

        zt = teacher_ds_config(part.ds_config, "fp32")["zero_optimization"]
        counts = counts_of(repl.teacher.net, int(zt["stage3_param_persistence_threshold"]))
        result["plan_gather_elements"] = teacher_terms(counts, 1, WORLD_SIZE, True, zt)[1]
        result["plan_partition_elements"] = teacher_terms(counts, 1, WORLD_SIZE, True, zt)[0]
        # the zero.Init generator right after construction, gathered (before any step)
        result["gen_built"] = gathered_weights(part.gen_engine.module)
        result["gen_partition_numel"] = sum(p.ds_tensor.numel() for p in part.gen_engine.module.parameters())
        # one full iteration first: at the start G = fake = teacher and the generator loss is an exact
        # cancellation (0, gradients of rounding noise); after it the fake net differs from the teacher
        for trainer in (part, repl):
            trainer.train_step()
        result["partitioned"] = generator_gradients(part)
        result["replicated"] = generator_gradients(repl)
        result["replicated_detached"] = generator_gradients(repl, detach_teacher=True)
        # copy build vs zero.Init build: two optimizer steps, fp32 and bf16
        cond = repl.teacher.conditioner.encode(["a red circle", "a blue square"])
        result["teacher_buffers"] = {n: b.detach().clone() for n, b in teacher.named_buffers()}
        for precision in ("fp32", "bf16"):
            for construct in ("copy", "zero_init"):
                result[f"steps_{construct}_{precision}"] = two_steps(teacher, construct, precision, repl.ds_config,
                                                                    cond, repl.family, repl.schedule,
                                                                    repl.teacher.latent_shape)
        torch.save(result, out / f"rank{rank}.pt")
        shutdown_distributed()
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        sys.stderr.write(traceback.format_exc())
        os._exit(1)
