"""bf16 numerics on DeepSpeed: the generator EMA is taken from the fp32 master weights (ZeRO-1/2/3),
gradients accumulate in fp32 across micro-batches, and the full EMA is gathered to rank 0's host only."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch

from sidscale.checkpointing import files as ckpt_lib
from sidscale.config import load_config
from sidscale.core.ema import ema_beta
from tests.helpers.dist_launch import REPO

STEPS = 2


@pytest.fixture(scope="module")
def dist_info():
    """A 1-rank process group in this process (gloo), torn down and the environment restored afterwards."""
    from tests.helpers.inprocess import one_rank_group

    with one_rank_group() as info:
        yield info


@pytest.fixture
def teacher_dir(tiny_toy_teacher):
    return tiny_toy_teacher


def bf16_config(teacher_dir: Path, stage: int, extra: tuple[str, ...] = ()):
    # lr 1e-5: one Adam step moves a weight by ~1e-5, far below bf16's resolution of the toy net's
    # weights (~1e-3..1e-4), so the bf16 working copy moves in rare jumps while the masters move every
    # step; ema_rampup_ratio 0 gives beta = 0.5 each step (averages, not copies).
    return load_config("toy", [
        "train.precision=bf16", "teacher.dtype=fp32", "teacher.resolution=8", f"teacher.path={teacher_dir}",
        "data.shards=indexed:toy", "train.global_batch=4", "train.micro_batch=2", "train.seed=1",
        "generator.lr=1e-5", "fake.lr=1e-5", "train.ema_halflife_kimg=0.004", "train.ema_rampup_ratio=0",
        "eval.num_samples=0", f"deepspeed.config=ds_configs/zero{stage}.json", *extra])


def full_working_weights(trainer) -> dict[str, torch.Tensor]:
    """The generator's bf16 working weights as fp32 (1 rank: ZeRO-3's partition is the whole tensor)."""
    out = {}
    for name, p in trainer.gen_engine.module.named_parameters():
        w = p.ds_tensor[: p.ds_numel].view(p.ds_shape) if hasattr(p, "ds_tensor") else p.detach()
        out[name] = w.float().clone()
    return out


def full_masters(trainer) -> dict[str, torch.Tensor]:
    """The fp32 masters through DeepSpeed's public API (not through sidscale's segment mapping)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: safe_get_full_fp32_param(p).detach().float().clone().view(tuple(getattr(p, "ds_shape", p.shape)))
            for name, p in trainer.gen_engine.module.named_parameters()}


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_ema_follows_fp32_masters(dist_info, teacher_dir, tmp_path, stage):
    from sidscale.checkpointing.files import full_ema_from_checkpoint
    from sidscale.trainer import Trainer

    cfg = bf16_config(teacher_dir, stage)
    trainer = Trainer(cfg, tmp_path / "run", dist_info)
    expected_optimizer = {1: "BF16_Optimizer", 2: "DeepSpeedZeroOptimizer", 3: "DeepSpeedZeroOptimizer_Stage3"}
    assert type(trainer.gen_engine.optimizer).__name__ == expected_optimizer[stage]
    # both references start where the trainer's EMA starts: the masters are the bf16 weights at init
    ema_master, ema_bf16 = full_masters(trainer), full_working_weights(trainer)
    start = {k: v.clone() for k, v in ema_master.items()}
    assert max_diff(ema_master, ema_bf16) == 0
    for _ in range(STEPS):
        tc = cfg.train
        beta = ema_beta(tc.global_batch, trainer.images_seen, tc.ema_halflife_kimg, tc.ema_rampup_ratio)
        stats = trainer.train_step()
        assert stats["skipped_gen"].item() == 0
        for ref, cur in ((ema_master, full_masters(trainer)), (ema_bf16, full_working_weights(trainer))):
            for k in ref:
                ref[k].lerp_(cur[k], 1.0 - beta)
    assert beta == pytest.approx(0.5)
    ema = trainer.ema.gather_to_main()
    assert max_diff(ema, ema_master) < 1e-9
    # distinguishable: the bf16 working weights' EMA is off by a large part of what the masters moved
    moved = max_diff(ema_master, start)
    assert moved > 5e-6
    assert max_diff(ema, ema_bf16) > 0.2 * moved
    # the checkpoint's shards reassemble offline (no process group) to the same EMA, and load back
    path = trainer.save_checkpoint()
    offline = full_ema_from_checkpoint(path)
    assert all(torch.equal(offline[k], ema[k]) for k in ema)
    state = trainer.ema.state_dict()
    for s in trainer.ema.shards:
        s.zero_()
    trainer.ema.load_state_dict(state)
    assert all(torch.equal(trainer.ema.gather_to_main()[k], ema[k]) for k in ema)
    trainer.ema.load_full(offline)  # the path for checkpoints of the older layout
    assert all(torch.equal(trainer.ema.gather_to_main()[k], ema[k]) for k in ema)
    # the preview network holds the EMA (in the teacher's dtype) only inside the block, then is freed
    with trainer.ema_unet() as unet:
        assert all(torch.equal(w, ema[k].to(w.dtype)) for k, w in unet.state_dict().items())
        ref = weakref.ref(unet)
        del unet
    gc.collect()
    assert ref() is None, "the preview network outlived the preview"
    # resume is exact: a fresh trainer loaded from the checkpoint continues like the original; the
    # rank file is rewritten in the older EMA layout (per-parameter slices), which resume converts
    rank_file = path / "rank_00000.pt"
    client = torch.load(rank_file, weights_only=False)
    client["ema"] = {"zero3": stage == 3, "world_size": 1, "rank": 0,
                     "shards": [offline[n].reshape(-1).clone() for n in trainer.ema.names]}
    torch.save(client, rank_file)
    # ...and recorded in meta.json, as the writer of such a checkpoint would have (resume verifies it)
    meta = ckpt_lib.read_meta(path)
    meta["files"]["rank_00000.pt"] = ckpt_lib.file_checksum(rank_file)
    ckpt_lib.write_meta(path, {k: v for k, v in meta.items() if k != ckpt_lib.META_CRC})
    resumed = Trainer(cfg, tmp_path / "resumed", dist_info)
    resumed.resume(path)
    assert max_diff(resumed.ema.gather_to_main(), ema) == 0
    if stage == 3:  # ZeRO-3 previews with the EMA swapped into the partitioned generator (no full copy)
        prompts, seeds = ["a red circle", "a blue square"], [3, 4]
        with torch.no_grad(), trainer.ema_unet() as unet:  # the copy, in the working dtype (bf16)
            want = trainer.generate_with(unet.to(torch.bfloat16), prompts, seeds)
        before = full_working_weights(trainer)
        with torch.no_grad(), trainer.ema_in_generator() as module:
            assert max_diff(full_working_weights(trainer), {k: v.to(torch.bfloat16) for k, v in ema.items()}) == 0
            # every weight the forward uses is the EMA's, persistent (small, never partitioned) ones included
            assert torch.equal(trainer.generate_with(module, prompts, seeds), want)
        assert max_diff(full_working_weights(trainer), before) == 0
        # and training goes on exactly as without the preview (the resumed twin below had none)
    for t in (trainer, resumed):
        t.train_step()
    assert max_diff(full_masters(resumed), full_masters(trainer)) == 0
    assert max_diff(resumed.ema.gather_to_main(), trainer.ema.gather_to_main()) == 0


class _Probe(torch.nn.Module):
    """loss = sum(w * x): the gradient of w is x, so each micro-batch contributes a chosen gradient."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.w * x).sum()


def accumulated_gradient(ds_config: dict, contributions: list[float]) -> tuple[float, str]:
    """The gradient the optimizer receives after one step over ``len(contributions)`` micro-batches
    (read by a pre-step hook on the torch optimizer inside the ZeRO wrapper), and DeepSpeed's wrapper."""
    import deepspeed

    model = _Probe()
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                                      config=ds_config)
    seen = []
    engine.basic_optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.extend(p.grad[0].item() for g in opt.param_groups for p in g["params"]))
    for c in contributions:
        engine.backward(engine(torch.full((16,), c, dtype=torch.bfloat16)))
        engine.step()
    assert len(seen) == 1, "exactly one optimizer step at the accumulation boundary"
    return seen[0], type(engine.optimizer).__name__


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_gradients_accumulate_in_fp32(dist_info, stage):
    """Micro-batch gradients 1, 2^-10, 2^-10, 2^-10 (each exact in bf16), averaged over 4 by DeepSpeed:
    summed in bf16 the small ones vanish (0.25 has an ulp of 2^-9), summed in fp32 they stay."""
    from sidscale.distributed.ds_config import build_ds_config

    cfg = load_config("toy", ["train.precision=bf16", "train.global_batch=4", "train.micro_batch=1",
                              f"deepspeed.config=ds_configs/zero{stage}.json"])
    ds = build_ds_config(cfg, world_size=1)
    assert ds["gradient_accumulation_steps"] == 4
    contributions = [1.0] + [2.0**-10] * 3
    exact = sum(contributions) / 4
    got, wrapper = accumulated_gradient(ds, contributions)
    assert got == exact, (stage, wrapper, got)
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds.get("communication_data_type") == ("fp32" if stage == 1 else None)
    # DeepSpeed's default (the model dtype) loses them: what sidscale's setting fixes
    default = {k: v for k, v in ds.items() if k not in ("data_types", "communication_data_type")}
    got_default, _ = accumulated_gradient(default, contributions)
    assert got_default == 0.25, (stage, got_default)


@pytest.mark.slow
def test_two_rank_partitions_gather_to_rank0_only(tmp_path):
    """ZeRO-1/2/3 with bf16 on 2 ranks (tests/helpers/ema_partition_worker.py): the EMA shards follow the
    optimizer's partition (parameters split across the rank boundary), rank 0's gather equals
    DeepSpeed's full masters, the shards' concatenation and the offline reassembly; rank 1
    receives nothing during the gather, and every tensor it sends is one chunk. ZeRO-3: the EMA swapped
    into the partitioned module (the previews' path) computes what the EMA computes, then is undone."""
    from tests.helpers.dist_launch import run_script_ranks

    proc = run_script_ranks(REPO / "tests" / "helpers" / "ema_partition_worker.py", [str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    chunk_per_rank = 10 // 2
    for stage, wrapper in ((1, "BF16_Optimizer"), (2, "DeepSpeedZeroOptimizer"), (3, "DeepSpeedZeroOptimizer_Stage3")):
        a, b = r0[f"zero{stage}"], r1[f"zero{stage}"]
        assert a["optimizer"] == wrapper
        assert a["full_equals_masters"] and a["full_equals_offline"] and a["masters_moved"], (stage, a)
        assert a.get("full_equals_concat", True), stage
        assert a["split_params"] >= 1, "no parameter straddles the rank boundary: the case is too easy"
        assert b["full_is_none"]
        # each rank holds about half the model; rank 1's only collectives during the gather are gathers
        # of one chunk each, with nothing to receive into
        assert sum(b["shard_sizes"]) < b["full_numel"]
        assert b["calls"] and all(c["op"] == "gather" and c["list_items"] == 0 for c in b["calls"]), b["calls"]
        assert all(max(c["numel"]) <= chunk_per_rank for c in b["calls"])
        assert sum(max(c["numel"]) for c in b["calls"]) == sum(b["shard_sizes"])
    for r in (r0, r1):  # ZeRO-3 previews: the EMA swapped into the partitioned generator, then restored
        z3 = r["zero3"]
        assert z3["persistent"] == ["a.bias", "b.bias"], z3
        assert z3["swap_equals_plain_ema"] and z3["swap_restores"] and z3["swap_differs_from_weights"], z3
