"""The data-aided adversarial method end to end on 2 CPU ranks: it trains (the discriminator alone during
the warm-up, then the generator), checkpoints, resumes bit for bit in fp32 (VP toy teacher) and resumes
elastically on another number of ranks (flow toy teacher), with the real-data cursor in the checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from sidscale.checkpointing.files import find_resume_checkpoint, read_meta
from tests.helpers.dist_launch import run_trainer
from tests.helpers.reference_run import BASE, assert_identical, stopped_at

# warm-up: images_seen 0 and 8 are <= 8, so steps 1-2 train the discriminator only; the adversarial
# term joins once images_seen > 16 (step 4 on)
ADVERSARIAL = ["method.adversarial.enabled=true", "data.real_shards=toy", "method.adversarial.disc_warmup_kimg=0.008",
               "method.adversarial.mix_after_kimg=0.016"]


def logged(run_dir: Path) -> dict[int, dict[str, float]]:
    """step -> TensorBoard scalars of the run (train.log_every = 1)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    out: dict[int, dict[str, float]] = {}
    for tag in events.Tags()["scalars"]:
        for e in events.Scalars(tag):
            out.setdefault(e.step, {})[tag] = e.value
    return out


def rank_file(ckpt: Path, rank: int) -> dict:
    return torch.load(ckpt / f"rank_{rank:05d}.pt", weights_only=False)


@pytest.fixture(scope="module")
def adversarial_run(tiny_toy_teacher, tmp_path_factory):
    run = tmp_path_factory.mktemp("sida") / "run"
    run_trainer(run, BASE + ADVERSARIAL + [f"teacher.path={tiny_toy_teacher}"])
    return run


@pytest.mark.slow
def test_warmup_trains_the_discriminator_alone_then_the_generator(adversarial_run, tiny_toy_teacher):
    from diffusers import UNet2DConditionModel

    teacher = UNet2DConditionModel.from_pretrained(tiny_toy_teacher / "unet").state_dict()
    step2 = adversarial_run / "checkpoints" / "step_00000002"
    gen2 = get_fp32_state_dict_from_zero_checkpoint(str(step2), tag="generator")
    fake2 = get_fp32_state_dict_from_zero_checkpoint(str(step2), tag="fake")
    assert all(torch.equal(gen2[k], teacher[k].float()) for k in teacher)  # no generator step in the warm-up
    assert any(not torch.equal(fake2[k], teacher[k].float()) for k in teacher)  # the discriminator trained
    gen4 = get_fp32_state_dict_from_zero_checkpoint(str(adversarial_run / "checkpoints" / "step_00000004"),
                                                    tag="generator")
    assert any(not torch.equal(gen4[k], gen2[k]) for k in gen2)
    by_step = logged(adversarial_run)
    assert by_step[1]["adversarial/loss_disc"] > 0 and by_step[1]["fp16/skipped_gen"] == 0
    assert by_step[2]["loss/gen"] != by_step[2]["loss/gen"]  # NaN: the generator did not run
    assert by_step[3]["adversarial/mix_weight"] == 0.0 and by_step[5]["adversarial/mix_weight"] == 0.5
    assert by_step[5]["adversarial/loss_gen_adv"] > 0
    # every rank's real-data cursor is in its rank file
    final = find_resume_checkpoint(adversarial_run)
    assert all("real_data" in rank_file(final, r) for r in range(2))


@pytest.mark.slow
def test_adversarial_resume_is_exact(adversarial_run, tiny_toy_teacher, tmp_path):
    split = stopped_at(adversarial_run, 2, tmp_path / "split")
    proc = run_trainer(split, BASE + ADVERSARIAL + [f"teacher.path={tiny_toy_teacher}"])
    assert "resumed from" in proc.stdout
    assert_identical(split, adversarial_run)
    final, want = find_resume_checkpoint(split), find_resume_checkpoint(adversarial_run)
    for r in range(2):
        assert rank_file(final, r)["real_data"] == rank_file(want, r)["real_data"]


@pytest.mark.slow
def test_flow_adversarial_run_resumes_elastically_on_two_ranks(tiny_toy_flow_teacher, tmp_path):
    run = tmp_path / "run"
    settings = BASE + ADVERSARIAL + ["teacher.kind=toy_flow", f"teacher.path={tiny_toy_flow_teacher}",
                                     "method.gen_weighting=one_minus_sigma", "train.max_steps=4"]
    run_trainer(run, settings[:-1] + ["train.max_steps=2"], nproc=1)
    out = run_trainer(run, settings, nproc=2)
    assert "written by 1 ranks, resharded for 2" in out.stdout
    ckpt = find_resume_checkpoint(run)
    assert read_meta(ckpt)["world_size"] == 2 and read_meta(ckpt)["step"] == 4
    assert all("real_data" in rank_file(ckpt, r) for r in range(2))
    gen2 = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints" / "step_00000002"), tag="generator")
    gen4 = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="generator")
    assert all(torch.isfinite(v).all() for v in gen4.values()) and any(not torch.equal(gen4[k], gen2[k]) for k in gen2)


def _png(seed: int, size: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux"])  # SD3's read-out is the same module (the family contract test)
def test_mmdit_families_train_adversarially_from_image_shards_under_zero3(family, tmp_path):
    """FLUX (tiny teacher, one in-process rank, ZeRO-3: the read-out hooks a partitioned fake net):
    image shards are VAE-encoded in the loop, the discriminator trains from the first step, the generator
    after the warm-up, with both adversarial terms finite and the read-out's logits of the right width."""
    from sidscale.data.real_shards import write_real_shards
    from sidscale.families import SPECS
    from tests.helpers.inprocess import run_main

    spec = SPECS[family]
    teacher = spec.write_tiny(tmp_path / "teacher", seed=0)
    size = 64
    write_real_shards(((f"a photo number {i}", "png", _png(i, size)) for i in range(8)), tmp_path / "real",
                      kind="image", shard_size=4)
    res = run_main(tmp_path / "run", [
        *spec.tiny_overrides, f"teacher.path={teacher}", "teacher.dtype=fp32", "train.precision=fp32",
        "train.global_batch=2", "train.micro_batch=1", "train.max_steps=3", "train.ckpt_every=3",
        "train.preview_every=100", "train.log_every=1", "train.export_at_end=false", "data.shards=indexed:toy",
        "data.num_workers=0", "eval.num_samples=0", "deepspeed.config=ds_configs/zero3.json",
        "method.adversarial.enabled=true", f"data.real_shards={tmp_path / 'real' / 'manifest.json'}",
        "method.adversarial.disc_warmup_kimg=0.001", "method.adversarial.mix_after_kimg=0.002",
        "method.gen_weighting=one_minus_sigma", "generator.lr=1e-3", "fake.lr=1e-3"])
    assert res.returncode == 0, res.stderr[-3000:]
    by_step = logged(tmp_path / "run")
    assert by_step[1]["adversarial/loss_disc"] > 0 and by_step[1]["loss/gen"] != by_step[1]["loss/gen"]
    assert by_step[3]["adversarial/mix_weight"] == 0.5 and by_step[3]["adversarial/loss_gen_adv"] > 0
    assert all(v == v for s in (2, 3) for k, v in by_step[s].items() if k.startswith(("loss/", "adversarial/")))
    assert by_step[3]["data/real_samples"] >= 3
