"""DeepSpeed trainer behaviour on 2 CPU ranks: exact resume, export, precision modes, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_file

from sidscale.checkpointing.files import find_resume_checkpoint, full_ema_from_checkpoint
from tests.helpers.dist_launch import REPO, run_trainer
from tests.helpers.inprocess import one_rank_trainer, run_main
from tests.helpers.reference_run import assert_identical, stopped_at
from tests.helpers.reference_run import overrides as reference_overrides

BASE = [
    "train.precision=fp32", "train.global_batch=8", "train.micro_batch=2", "train.preview_every=2",
    "train.log_every=1", "train.export_at_end=false", "teacher.dtype=fp32", "teacher.resolution=8",
    "data.shards=toy", "data.num_workers=1", "train.seed=3", "generator.lr=1e-2", "fake.lr=1e-2",
    "train.ema_halflife_kimg=0.01", "eval.num_samples=0", "train.keep_last=5", "eval.teacher_steps=2",
]


@pytest.fixture
def teacher_dir(tiny_toy_teacher):
    return tiny_toy_teacher


def final_weights(run_dir):
    ckpt = find_resume_checkpoint(run_dir)
    return ckpt, {tag: get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag) for tag in ("generator", "fake")}


@pytest.mark.slow
def test_resume_is_exact(tmp_path, tiny_toy_teacher, fp32_reference_run):
    """The shared run's step-2 checkpoint (as a run stopped there leaves it), continued to step 6:
    identical to the uninterrupted run in both engines' weights and optimizer-driven updates, the EMA
    and the data cursor."""
    common = reference_overrides(tiny_toy_teacher)
    split = stopped_at(fp32_reference_run, 2, tmp_path / "split")
    proc = run_trainer(split, common)
    assert "resumed from" in proc.stdout and "step_00000002" in proc.stdout
    assert_identical(split, fp32_reference_run)
    # cadence artefacts: previews and TensorBoard events
    assert (fp32_reference_run / "samples" / "step_00000004.png").is_file()
    assert list((fp32_reference_run / "tb").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_export_loads_in_plain_diffusers_and_samples(tmp_path, teacher_dir):
    from diffusers import UNet2DConditionModel

    from sidscale.core.schedule import VPSchedule
    from sidscale.sample import FewStepPipeline as OneStepPipeline
    from sidscale.sample import seeded_latent_noise

    run_trainer(tmp_path / "run", BASE + [f"teacher.path={teacher_dir}", "train.max_steps=2",
                                          "train.ckpt_every=100", "train.export_at_end=true",
                                          "deepspeed.config=ds_configs/zero3.json", "eval.num_samples=64",
                                          "eval.teacher_steps=2", f"teacher.cache_dir={tmp_path / 'cache'}"])
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "run" / "export" / "unet")
    # the end-of-run toy evaluation equals an independent evaluation of the exported generator
    from sidscale.config import TeacherConfig
    from sidscale.families.toy.evaluation import toy_quality
    from sidscale.families.toy.fit import load_toy_mixture
    from sidscale.families.unet_vp.loading import load_teacher

    teacher = load_teacher(TeacherConfig(kind="toy", path=str(teacher_dir), dtype="fp32", resolution=8))
    expected = toy_quality(teacher, load_toy_mixture(teacher_dir), unet, 64, 2, 1.5, 625)
    got = json.loads((tmp_path / "run" / "toy_eval.json").read_text())
    for key in ("frechet_one_step", "frechet_teacher_ddim", "frechet_exact_vs_exact", "prompt_accuracy_one_step",
                "prompt_accuracy_teacher_ddim", "prompt_accuracy_exact", "colour_accuracy_one_step"):
        assert got[key] == pytest.approx(expected[key], rel=1e-4), key
    assert len(list((tmp_path / "cache" / "toy-eval-cache").glob("*.json"))) == 1  # the teacher's number, cached
    ema = full_ema_from_checkpoint(find_resume_checkpoint(tmp_path / "run"))
    sd = unet.state_dict()
    assert all(torch.equal(sd[k], ema[k]) for k in ema)
    meta = json.loads((tmp_path / "run" / "export" / "sidscale.json").read_text())
    assert meta["t_init"] == 625 and meta["latent_shape"] == [3, 8, 8]
    # sample.py against a direct computation of x_g = (x_in - s eps_G(x_in, t_init, c)) / a
    pipe = OneStepPipeline.from_export(tmp_path / "run" / "export")
    prompts, seeds = ["a red circle", "a blue square"], [11, 12]
    got = pipe.latents(prompts, seeds)
    sched = VPSchedule.from_settings()
    a, s = sched.alphas_cumprod[625].sqrt(), (1 - sched.alphas_cumprod[625]).sqrt()
    x_in = s * seeded_latent_noise(seeds, (3, 8, 8))
    with torch.no_grad():
        ehs = pipe.conditioner.encode(prompts)["encoder_hidden_states"]
        eps = unet(x_in, torch.tensor([625, 625]), encoder_hidden_states=ehs).sample
    torch.testing.assert_close(got, (x_in - s * eps) / a)
    # the CLI writes a PNG
    out = tmp_path / "img.png"
    subprocess.run([sys.executable, "-m", "sidscale.sample", "--model", str(tmp_path / "run" / "export"),
                    "--prompt", "a red circle", "--out", str(out)], check=True, cwd=REPO, capture_output=True)
    assert out.stat().st_size > 0


def test_bf16_runs_and_stays_finite(tmp_path, teacher_dir):
    proc = run_main(tmp_path / "run", BASE + [f"teacher.path={teacher_dir}", "train.max_steps=3",
                                              "train.precision=bf16", "train.ckpt_every=100"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, w = final_weights(tmp_path / "run")
    from diffusers import UNet2DConditionModel

    t = UNet2DConditionModel.from_pretrained(teacher_dir / "unet").state_dict()
    for tag in w:
        assert all(torch.isfinite(v).all() for v in w[tag].values())
        assert max((w[tag][k] - t[k]).abs().max().item() for k in t) > 1e-3, f"{tag} did not train"


def fp16_supported_here() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().is_fp16_supported()


def test_fp16_overflow_skips_both_engines_or_is_refused_on_this_cpu(tmp_path, teacher_dir):
    """Where DeepSpeed can train fp16 on this host: a loss scale of 2^60 overflows fp16 in the fake
    engine's first step, and the generator must skip that iteration too (its weights stay the
    teacher's). Where it cannot (oneDNN fp16 exists on some CPUs of this machine kind, not others):
    the user gets a clear error before any model is built. The skip decision itself is tested on every
    host by test_overflow_in_the_fake_step_skips_the_generator_and_the_ema."""
    cfg = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    cfg["fp16"] = {"initial_scale_power": 60, "hysteresis": 1}
    ds = tmp_path / "fp16.json"
    ds.write_text(json.dumps(cfg))
    common = BASE + [f"teacher.path={teacher_dir}", "train.precision=fp16", f"deepspeed.config={ds}",
                     "train.ckpt_every=1", "train.max_steps=1"]
    proc = run_main(tmp_path / "run", common)
    if not fp16_supported_here():
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "train.precision = 'fp16' is not supported" in proc.stderr and "use train.precision=bf16" in proc.stderr
        assert not (tmp_path / "run" / "checkpoints").exists()
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    from diffusers import UNet2DConditionModel

    t = UNet2DConditionModel.from_pretrained(teacher_dir / "unet").state_dict()
    _, w = final_weights(tmp_path / "run")
    for tag in w:
        # fp16 engines keep fp32 masters initialised from the fp16 copy of the teacher
        assert all(torch.equal(w[tag][k], t[k].half().float()) for k in t), f"{tag} stepped despite the overflow"


def _snapshot(trainer) -> tuple[dict, list]:
    gen = {k: v.detach().clone() for k, v in trainer.gen_engine.module.state_dict().items()}
    return gen, [s.clone() for s in trainer.ema.shards]


@pytest.mark.parametrize("overflow_in", ["fake", "generator"])
def test_overflow_in_the_fake_step_skips_the_generator_and_the_ema(tmp_path, teacher_dir, monkeypatch, overflow_in):
    """The skip rule of train_step on any host (fp32 engines; the loss scaler's verdict is forced): an
    overflow in the fake engine skips the whole generator phase and the EMA; one in the generator
    engine skips the EMA. A normal step afterwards moves both."""
    import sidscale.method.sid as train_mod

    overrides = BASE + [f"teacher.path={teacher_dir}", "train.max_steps=3", "data.shards=indexed:toy"]
    with one_rank_trainer(tmp_path / "run", overrides) as trainer:
        engine = trainer.fake_engine if overflow_in == "fake" else trainer.gen_engine
        gen_calls = []
        real_generator_step = train_mod.generator_step

        def counting_generator_step(*a, **kw):
            gen_calls.append(1)
            return real_generator_step(*a, **kw)

        monkeypatch.setattr(train_mod, "generator_step", counting_generator_step)
        # one normal step first, then an EMA that differs from the weights (early in a run the EMA's
        # ramp-up makes it equal them), so an EMA update that should have been skipped shows even
        # though the skipped step left the weights alone
        trainer.train_step()
        gen_calls.clear()
        for shard in trainer.ema.shards:
            shard.add_(1.0)
        with monkeypatch.context() as m:  # the loss scaler found inf/NaN: DeepSpeed skips step() and says so
            m.setattr(engine, "step", lambda *a, **kw: None)
            m.setattr(engine, "was_step_applied", lambda: False)
            gen_before, ema_before = _snapshot(trainer)
            stats = trainer.train_step()
            gen_after, ema_after = _snapshot(trainer)
        assert all(torch.equal(gen_before[k], gen_after[k]) for k in gen_before), "generator stepped"
        assert all(torch.equal(a, b) for a, b in zip(ema_before, ema_after, strict=True)), "EMA updated"
        assert float(stats["skipped_gen"]) == 1.0
        assert float(stats["skipped_fake"]) == (1.0 if overflow_in == "fake" else 0.0)
        assert len(gen_calls) == (0 if overflow_in == "fake" else trainer.gas)
        stats = trainer.train_step()  # no overflow: both move
        gen_next, ema_next = _snapshot(trainer)
        assert float(stats["skipped_gen"]) == 0.0
        assert any(not torch.equal(gen_after[k], gen_next[k]) for k in gen_after)
        assert any(not torch.equal(a, b) for a, b in zip(ema_after, ema_next, strict=True))


def run_single(tmp_path, overrides, run_dir=None):
    """The trainer's main() as one in-process rank (these tests check how it rejects its input)."""
    return run_main(run_dir or tmp_path / "run", overrides)


@pytest.mark.parametrize("setup, message", [
    ("missing", "deepspeed.config = 'nope.json': file not found"),
    ("invalid", "not valid JSON"),
    ("conflict", "train_batch_size = 64 conflicts with the sidscale config"),
    ("stage0", "zero_optimization.stage = 0; expected one of (1, 2, 3)"),
])
def test_bad_ds_config_is_a_clear_error(tmp_path, setup, message):
    path = tmp_path / "ds.json"
    if setup == "missing":
        path = "nope.json"
    elif setup == "invalid":
        path.write_text("{not json")
    elif setup == "conflict":
        path.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 2}}))
    else:
        path.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    proc = run_single(tmp_path, [f"deepspeed.config={path}"])
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unwritable_run_dir_and_refusing_to_overwrite(tmp_path, teacher_dir):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_single(tmp_path, [f"teacher.path={teacher_dir}"], run_dir=blocker / "run")
    assert proc.returncode == 2 and "not writable" in proc.stderr and str(blocker / "run") in proc.stderr
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "config.yaml").write_text("resume: true\n")
    proc = run_single(tmp_path, [f"teacher.path={teacher_dir}", "resume=false"], run_dir=existing)
    assert proc.returncode == 2 and "refusing to overwrite" in proc.stderr
    assert (existing / "config.yaml").read_text() == "resume: true\n"


def test_world_size_must_divide_the_batch(tmp_path, teacher_dir):
    proc = run_single(tmp_path, [f"teacher.path={teacher_dir}", "train.global_batch=6", "train.micro_batch=4"])
    assert proc.returncode == 2 and "train.global_batch" in proc.stderr


@pytest.mark.slow
def test_compiled_unets_train_like_eager(tmp_path, teacher_dir):
    """train.compile=true (aot_eager: the AOTAutograd graphs without inductor's minutes of C++ builds on
    this CPU) gives the eager run's weights; it changes how the UNets run, not what the method computes."""
    common = BASE + [f"teacher.path={teacher_dir}", "train.max_steps=1", "train.ckpt_every=1",
                     "train.preview_every=100", "generator.eps=1.0", "fake.eps=1.0"]
    assert run_main(tmp_path / "eager", common).returncode == 0
    proc = run_main(tmp_path / "compiled", common + ["train.compile=true", "train.compile_backend=aot_eager"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.compile (backend aot_eager)" in proc.stdout + proc.stderr
    torch._dynamo.reset()  # in-process: drop the compiled graphs of this test's modules
    _, eager = final_weights(tmp_path / "eager")
    _, compiled = final_weights(tmp_path / "compiled")
    start = load_file(teacher_dir / "unet" / "diffusion_pytorch_model.safetensors")
    for tag in ("generator", "fake"):
        diff = max((eager[tag][k] - compiled[tag][k]).abs().max().item() for k in eager[tag])
        moved = max((eager[tag][k] - start[k]).abs().max().item() for k in eager[tag])
        assert diff < 1e-5 and moved > 100 * diff, (tag, moved, diff)


def test_compile_with_zero3_is_a_clear_error(tmp_path, teacher_dir):
    proc = run_single(tmp_path, [f"teacher.path={teacher_dir}", "train.compile=true",
                                 "deepspeed.config=ds_configs/zero3.json"])
    assert proc.returncode == 2 and "train.compile = true with ZeRO-3" in proc.stderr
