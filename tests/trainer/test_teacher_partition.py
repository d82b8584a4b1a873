"""The partitioned frozen teacher (teacher.partitioned) and the zero.Init build of the trainable nets.

One 2-rank launch (tests/helpers/teacher_partition_worker.py) builds real Trainers on the tiny toy teacher
under ZeRO-3 in fp32 and saves what these tests compare:

- the generator's loss and every full gradient with the teacher partitioned equal the replicated
  teacher's bit for bit, the teacher really is partitioned (each rank holds half, at most one
  layer gathered while it runs, nothing after), and the teacher's path carries gradient (the
  control with its output detached differs, so equal gradients are not equal by accident);
- the generator built under ``deepspeed.zero.Init`` holds exactly the teacher's weights (gathered)
  with only its half on each rank, and a zero.Init-built engine trains exactly like the copy-built
  one for two Adam steps (fp32 and bf16: the same casts in the same order).

The resume test (2 more launches) trains with the partitioned teacher and checks exact resume.
The memory plan's teacher terms are checked against closed forms.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from sidscale.distributed.runtime import free_port

WORLD = 2


def run_two_ranks(teacher_dir: Path, out: Path, timeout: float = 600) -> list[dict]:
    from tests.helpers.dist_launch import _fork_context
    from tests.helpers.teacher_partition_worker import main

    ctx = _fork_context()
    port = str(free_port())
    procs = [ctx.Process(target=main, args=(r, WORLD, port, str(teacher_dir), str(out))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.exitcode is None:
            p.kill()
            p.join()
    errors = [(out / f"rank{r}.err").read_text() for r in range(WORLD) if (out / f"rank{r}.err").is_file()]
    assert not errors and all(p.exitcode == 0 for p in procs), "\n".join(errors) or [p.exitcode for p in procs]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    from sidscale.families.sd3.tiny import write_tiny_sd3_teacher

    teacher = write_tiny_sd3_teacher(tmp_path_factory.mktemp("sd3") / "teacher", seed=0, sd35=True)
    out = Path(tempfile.mkdtemp(prefix="sidscale-teacher-part-"))
    try:
        yield run_two_ranks(teacher, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.mark.slow
def test_generator_gradient_through_a_partitioned_teacher_is_bit_exact(ranks):
    for r, res in enumerate(ranks):
        assert res["placement"] == {"true": True, "false": False}
        part, repl, control = res["partitioned"], res["replicated"], res["replicated_detached"]
        assert torch.equal(part["loss"], repl["loss"]), f"rank {r}: loss {part['loss']} != {repl['loss']}"
        assert part["grads"].keys() == repl["grads"].keys()
        for name, g in repl["grads"].items():
            assert torch.equal(part["grads"][name], g), f"rank {r}: generator gradient of {name} differs"
        # the teacher's path matters: without it the gradient is a different one
        moved = max((control["grads"][n] - g).abs().max().item() for n, g in repl["grads"].items())
        assert moved > 1e-6 * max(g.abs().max().item() for g in repl["grads"].values())
    # data-parallel: the full gradient is the same on both ranks
    for name, g in ranks[0]["partitioned"]["grads"].items():
        assert torch.equal(ranks[1]["partitioned"]["grads"][name], g)


@pytest.mark.slow
def test_the_teacher_is_really_partitioned(ranks):
    for res in ranks:
        assert res["teacher_is_module"]  # the network the method calls is the engine's .module
        numel = res["teacher_numel"]
        assert numel == sum(t.numel() for t in res["teacher_full"].values())
        # each rank holds about half (ZeRO pads each parameter to a multiple of the world size) ...
        assert numel / WORLD <= res["teacher_partition_numel"] <= numel / WORLD + len(res["teacher_full"])
        assert res["plan_partition_elements"] == {"teacher_net_partition": numel / WORLD}
        # ... and while it runs, at most what the memory plan predicts (one block with prefetch and
        # reuse 0 in this run; measured: one transformer block, in the checkpoint recomputation of
        # the generator's backward), nothing left afterwards
        gathered = res["partitioned"]["gathered_max"]
        assert 0 < gathered <= res["plan_gather_elements"] < numel / 2
        assert len({".".join(n.split(".")[:2]) for n in res["partitioned"]["gathered_names"]}) == 1  # one block
        assert res["partitioned"]["gathered_after"] == 0


@pytest.mark.slow
def test_zero_init_generator_holds_the_teacher_weights(ranks):
    for res in ranks:
        teacher = res["teacher_full"]
        assert res["gen_built"].keys() == teacher.keys()
        for name, b in res["teacher_buffers"].items():  # SD3's pos_embed table: fp32, as the copy build's
            assert torch.equal(res["steps_zero_init_fp32"]["buffers"][name], b.float())
        for name, w in teacher.items():
            assert torch.equal(res["gen_built"][name], w.float()), name
        numel = sum(t.numel() for t in teacher.values())
        assert res["gen_partition_numel"] <= numel / WORLD + len(teacher)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero_init_build_trains_like_the_copy_build(ranks, precision):
    for res in ranks:
        copy_, init = res[f"steps_copy_{precision}"], res[f"steps_zero_init_{precision}"]
        for a, b in zip(copy_["masters"], init["masters"], strict=True):
            assert torch.equal(a, b)
        for name, w in copy_["weights"].items():
            assert torch.equal(init["weights"][name], w), name
        # it trained (two steps moved the weights off the teacher's)
        teacher = res["teacher_full"]
        assert max((copy_["weights"][n].float() - teacher[n]).abs().max().item() for n in teacher) > 1e-3


# ------------------------------------------------------------------------------- the memory plan


def test_plan_counts_the_teacher_placement():
    from sidscale.perf.memory_plan import PlanInput, construction_terms
    from sidscale.perf.zero_terms import NetCounts, teacher_terms

    c = NetCounts(params=1_000_000, buffers=0, largest_module=40_000, persistent=10_000, largest_block=60_000)
    zt = {"stage3_max_live_parameters": 10**9, "stage3_prefetch_bucket_size": 100_000,
          "stage3_max_reuse_distance": 0}
    replicated, gather = teacher_terms(c, 2, 8, False, zt)
    assert replicated == {"teacher_net": 2_000_000.0} and gather == 0.0
    part, gather = teacher_terms(c, 2, 8, True, zt)
    assert part == {"teacher_net_partition": 2 * 990_000 / 8, "teacher_net_persistent": 20_000.0}
    assert gather == 2 * (60_000 + 100_000)  # the running block plus one prefetch bucket
    _, gather = teacher_terms(c, 2, 8, True, {**zt, "stage3_prefetch_bucket_size": 10**9})
    assert gather == 2 * 990_000  # never more than the whole sharded teacher
    # construction: the copy build holds a full fp32 copy; the zero.Init build peaks in the fake engine's
    # initialize_optimizer_states (bf16 + fp32 partitions + the temporary fp32 gradient buffer of its sub-group),
    # above the one module (80 000 bytes) it held whole before partitioning it
    inp = PlanInput("tiny", gpus=8, zero=3, precision="bf16", teacher_dtype="bf16")
    copy_build = construction_terms(c, 0, inp, {"generator_params": 1.0, "generator_adam_states": 9.0},
                                    zero_init=False)
    init_build = construction_terms(c, 0, inp, {"generator_params": 1.0}, zero_init=True)
    assert copy_build["fake_fp32_copy"] == 4_000_000 and copy_build["generator_built"] == 1.0  # Adam is lazy
    assert (init_build["fake_params"], init_build["fake_fp32_master"],
            init_build["fake_fp32_grad_buffer_at_init"]) == (2 * 125_000, 4 * 125_000, 4 * 125_000)
    assert copy_build["teacher_whole"] == init_build["teacher_whole"] == 2_000_000


def test_plan_partitioned_teacher_saves_its_share_on_a_big_preset():
    from sidscale.perf.memory_plan import GIB, PlanInput, plan

    inp = dict(preset="sd35_large", gpus=8, zero=3, grad_checkpointing=True)
    repl = plan(PlanInput(**inp), micro_batch=1)
    part = plan(PlanInput(**inp, teacher_partitioned=True), micro_batch=1)
    teacher_bf16 = repl.terms["teacher_net"]
    assert teacher_bf16 / GIB == pytest.approx(15.0, abs=0.05)  # 8.06 B parameters in bf16 (method doc 5.1)
    assert part.terms["teacher_net"] == pytest.approx(teacher_bf16 / 8, rel=1e-6)
    # G's and the teacher's gathers never coincide (one network runs at a time): the saving is the 7/8
    assert repl.total - part.total == pytest.approx(teacher_bf16 * 7 / 8, rel=1e-6)
    assert part.construction_total < repl.total  # the zero.Init build never holds a full fp32 copy


def test_placement_setting_is_validated_and_yaml_bools_accepted(tmp_path):
    from sidscale.config import ConfigError, load_config

    assert load_config("toy").teacher.partitioned == "auto"
    assert load_config("toy", ["teacher.partitioned=true"]).teacher.partitioned == "true"
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("teacher:\n  partitioned: false\n")
    assert load_config(str(cfg_file)).teacher.partitioned == "false"
    with pytest.raises(ConfigError, match="teacher.partitioned"):
        load_config("toy", ["teacher.partitioned=yes"])
    with pytest.raises(ConfigError, match="train.compile"):
        load_config("toy", ["teacher.partitioned=true", "train.compile=true"])


def test_teacher_ds_config_has_no_optimizer_and_the_teacher_dtype():
    from sidscale.distributed.teacher_partition import teacher_ds_config

    user = json.loads((Path(__file__).resolve().parents[2] / "ds_configs" / "zero3_offload.json").read_text())
    user.update(train_batch_size=8, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2)
    cfg = teacher_ds_config(user, "bf16")
    assert cfg["zero_optimization"]["stage"] == 3 and "offload_optimizer" not in cfg["zero_optimization"]
    assert cfg["zero_optimization"]["offload_param"] == user["zero_optimization"]["offload_param"]
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"] and "optimizer" not in cfg
    assert not teacher_ds_config(user, "fp32")["bf16"]["enabled"]


def test_auto_placement_follows_the_memory_plan(tiny_toy_teacher, monkeypatch):
    """``auto`` replicates exactly when the plan's bytes with a replicated teacher fit the device."""
    from sidscale.config import load_config
    from sidscale.distributed.ds_config import build_ds_config
    from sidscale.distributed.teacher_partition import choose_placement
    from sidscale.families.unet_vp.loading import load_teacher
    from sidscale.perf import placement
    from sidscale.perf.placement import USABLE_FRACTION, placement_numbers, replicated_teacher_fits

    cfg = load_config("toy", [f"teacher.path={tiny_toy_teacher}", "teacher.dtype=fp32", "teacher.resolution=8",
                              "train.precision=fp32", "train.global_batch=8", "train.micro_batch=2",
                              "deepspeed.config=ds_configs/zero3.json"])
    teacher = load_teacher(cfg.teacher)
    ds = build_ds_config(cfg, 2)
    cpu = torch.device("cpu")
    p = sum(t.numel() for t in teacher.net.parameters())
    n = placement_numbers(teacher, cfg, ds, 2, cpu)
    assert n["replicated_teacher"] == 4 * p  # fp32, whole
    assert n["partitioned_teacher"] == 4 * -(-p // 2)  # its padded half
    assert n["replicated_model_states"] - n["partitioned_model_states"] == n["replicated_teacher"] - \
        n["partitioned_teacher"]
    assert n["activations"] and n["activations"] > 0  # measured on meta through the family's prediction function
    states, need = n["replicated_model_states"], n["replicated_model_states"] + n["activations"]
    # just above / below the need, and between the model states and the need (the activations count)
    for capacity, fits in ((need * 1.001, True), (need * 0.999, False), ((states + need) / 2, False)):
        capacity /= USABLE_FRACTION
        monkeypatch.setattr(placement, "device_capacity_bytes", lambda device, c=capacity: int(c))
        ok, detail = replicated_teacher_fits(teacher, cfg, ds, 2, cpu)
        assert ok is fits and "GiB" in detail
        chosen = choose_placement("auto", ok, detail)
        assert chosen.partitioned is not fits and ("partitioned" if not fits else "replicated") in chosen.reason
    assert choose_placement("true").partitioned and not choose_placement("false").partitioned
