"""Stable Diffusion teachers: loading (SD1.5, SD2.1-v, SDXL shapes), conditioning against diffusers'
own pipeline, v-prediction, clear errors for broken teacher dirs, memory levers, 2-rank training."""

from __future__ import annotations

import copy
import pickle
import shutil

import pytest
import torch

from sidscale.config import ConfigError, TeacherConfig
from sidscale.errors import TeacherDirError
from sidscale.families.shared.clip import SdxlConditioner, unet_kwargs
from sidscale.families.unet_vp.adapter import UNetEps
from sidscale.families.unet_vp.loading import attention_processors, load_teacher, set_attention
from sidscale.families.unet_vp.tiny import (
    SDXL_POOLED_DIM,
    SDXL_TEXT_HIDDEN,
    write_tiny_sd_teacher,
    write_tiny_sdxl_teacher,
)
from tests.helpers.dist_launch import run_trainer

RES = 64  # pixels -> 4 x 8 x 8 latents through the factor-8 tiny VAE


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {
        "sd15": write_tiny_sd_teacher(root / "sd15"),
        "sd21v": write_tiny_sd_teacher(root / "sd21v", seed=5, prediction_type="v_prediction", sd2=True),
        "sdxl": write_tiny_sdxl_teacher(root / "sdxl", seed=7),
    }


def load(path, kind="sd", **kw):
    dtype = kw.pop("dtype", "fp32")
    return load_teacher(TeacherConfig(kind=kind, path=str(path), dtype=dtype, resolution=RES, **kw))


# ------------------------------------------------------------------------------------ loading


def test_sd15_loads_frozen_with_sd_shapes(dirs):
    t = load(dirs["sd15"])
    assert t.latent_shape == (4, 8, 8) and t.scaling_factor == pytest.approx(0.18215)
    assert t.schedule.prediction_type == "epsilon" and t.vae is not None
    assert not any(p.requires_grad for p in t.net.parameters())
    assert not any(p.requires_grad for p in t.conditioner.text_encoder.parameters())
    cond = t.conditioner.encode(["a red circle", "a blue square"])
    assert set(cond) == {"encoder_hidden_states"} and cond["encoder_hidden_states"].shape == (2, 77, 32)
    assert t.conditioner.tokenize(["a", "b", "c"]).shape == (3, 77)
    empty = t.conditioner.empty(3)["encoder_hidden_states"]
    assert empty.shape == (3, 77, 32)
    assert torch.equal(empty[0], t.conditioner.encode([""])["encoder_hidden_states"][0])


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_teacher_dtype(dirs, dtype, torch_dtype):
    t = load(dirs["sd15"], dtype=dtype)
    assert next(t.net.parameters()).dtype == torch_dtype
    assert next(t.conditioner.text_encoder.parameters()).dtype == torch_dtype
    cond = t.conditioner.encode(["a red circle"])
    assert cond["encoder_hidden_states"].dtype == torch_dtype
    eps = UNetEps(t.net, t.schedule)(torch.randn(1, *t.latent_shape), torch.tensor([500]), cond)
    assert eps.dtype == torch.float32 and torch.isfinite(eps).all()


def test_v_prediction_teacher_x0_matches_closed_form(dirs):
    t = load(dirs["sd21v"])
    assert t.schedule.prediction_type == "v_prediction"
    torch.manual_seed(0)
    x_t = torch.randn(3, *t.latent_shape)
    ts = torch.tensor([20, 625, 979])
    cond = t.conditioner.encode(["a", "b", "c"])
    v = t.net(x_t, ts, **unet_kwargs(cond)).sample
    eps = UNetEps(t.net, t.schedule)(x_t, ts, cond)
    abar = t.schedule.alphas_cumprod[ts].reshape(-1, 1, 1, 1)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    # x0 = sqrt(abar) x_t - sqrt(1-abar) v ; eps = sqrt(1-abar) x_t + sqrt(abar) v
    torch.testing.assert_close(t.schedule.eps_to_x0(x_t, eps, ts), a * x_t - s * v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps, s * x_t + a * v, rtol=1e-5, atol=1e-5)
    # the config can override the scheduler's prediction type
    assert load(dirs["sd21v"], prediction_type="epsilon").schedule.prediction_type == "epsilon"


# ------------------------------------------------------------------------------------ SDXL conditioning


def sdxl_pipeline(t):
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    c = t.conditioner
    return StableDiffusionXLPipeline(
        vae=t.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2, tokenizer=c.tokenizer,
        tokenizer_2=c.tokenizer_2, unet=t.net, scheduler=DDPMScheduler.from_pretrained(t.path / "scheduler"),
    )


def test_sdxl_conditioning_equals_diffusers_encode_prompt(dirs):
    t = load(dirs["sdxl"], kind="sdxl")
    assert isinstance(t.conditioner, SdxlConditioner) and t.latent_shape == (4, 8, 8)
    assert t.scaling_factor == pytest.approx(0.13025)
    prompts = ["a red circle on a very long line " * 12, "a blue square!", ""]
    cond = t.conditioner.encode(prompts)
    pipe = sdxl_pipeline(t)
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    assert cond["encoder_hidden_states"].shape == (3, 77, sum(SDXL_TEXT_HIDDEN))
    assert cond["text_embeds"].shape == (3, SDXL_POOLED_DIM) and cond["time_ids"].shape == (3, 6)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["text_embeds"], pooled, rtol=0, atol=0)
    time_ids = pipe._get_add_time_ids((RES, RES), (0, 0), (RES, RES), dtype=torch.float32,
                                      text_encoder_projection_dim=SDXL_POOLED_DIM)
    torch.testing.assert_close(cond["time_ids"], time_ids.expand(3, -1), rtol=0, atol=0)
    # the UNet takes it, and the tokenized path gives the same cond
    ids = t.conditioner.tokenize(prompts)
    assert ids.shape == (3, 2, 77) and ids.dtype == torch.long
    assert all(torch.equal(v, t.conditioner.encode_ids(ids)[k]) for k, v in cond.items())
    out = t.net(torch.randn(3, *t.latent_shape), torch.tensor([1, 500, 900]), **unet_kwargs(cond)).sample
    assert out.shape == (3, *t.latent_shape)


def test_sdxl_uncond_is_encoded_empty_prompt_not_zeros(dirs):
    """Method page: uncond = E(""), encoded like any prompt. diffusers' pipeline (with
    force_zeros_for_empty_prompt) would use zeros instead; make sure we did not copy that."""
    t = load(dirs["sdxl"], kind="sdxl")
    empty = t.conditioner.empty(2)
    ref = t.conditioner.encode([""])
    for k in ref:
        assert empty[k].shape[0] == 2 and torch.equal(empty[k][1], ref[k][0])
    assert empty["encoder_hidden_states"].abs().sum() > 0 and empty["text_embeds"].abs().sum() > 0
    assert t.conditioner._empty is not None  # computed once, then reused
    cached = t.conditioner._empty
    t.conditioner.empty(4)
    assert t.conditioner._empty is cached


def test_tokenize_pickles_without_the_encoders(dirs):
    t = load(dirs["sdxl"], kind="sdxl")
    blob = pickle.dumps(t.conditioner.tokenize)
    assert len(blob) < 20 * 2**20 and b"text_model" not in blob
    assert torch.equal(pickle.loads(blob)(["a cat"]), t.conditioner.tokenize(["a cat"]))


def test_sdxl_time_ids_follow_resolution(dirs):
    t = load_teacher(TeacherConfig(kind="sdxl", path=str(dirs["sdxl"]), dtype="fp32", resolution=128))
    assert t.conditioner.time_ids == (128, 128, 0, 0, 128, 128) and t.latent_shape == (4, 16, 16)


# ------------------------------------------------------------------------------------ clear errors


def broken_copy(src, dst, remove: str):
    shutil.copytree(src, dst)
    target = dst / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    return dst


@pytest.mark.parametrize("kind,remove,expect", [
    ("sd", "unet", ["missing unet/", "unet/, text_encoder/, tokenizer/, scheduler/, vae/"]),
    ("sd", "vae", ["missing vae/"]),
    ("sd", "text_encoder/config.json", ["missing config.json", "text_encoder"]),
    ("sd", "unet/diffusion_pytorch_model.safetensors", ["no weights file", "unet"]),
    ("sd", "tokenizer/vocab.json", ["no vocab.json, tokenizer.json or spiece.model"]),
    ("sd", "scheduler/scheduler_config.json", ["missing scheduler_config.json"]),
    ("sdxl", "text_encoder_2", ["missing text_encoder_2/", "tokenizer_2/"]),
    ("sdxl", "tokenizer_2", ["missing tokenizer_2/"]),
])
def test_missing_file_is_a_clear_error(dirs, tmp_path, kind, remove, expect):
    src = dirs["sdxl"] if kind == "sdxl" else dirs["sd15"]
    path = broken_copy(src, tmp_path / "t", remove)
    with pytest.raises(TeacherDirError) as err:
        load(path, kind=kind)
    msg = str(err.value)
    assert str(path) in msg and all(e in msg for e in expect), msg


def test_not_a_directory_and_preset_placeholder(tmp_path):
    with pytest.raises(TeacherDirError, match="not a directory.*must contain unet/"):
        load(tmp_path / "nope")
    with pytest.raises(TeacherDirError, match="placeholder.*teacher.path"):
        load("/path/to/stable-diffusion-v1-5")


def test_kind_mismatch_is_a_clear_error(dirs):
    with pytest.raises(TeacherDirError, match="SDXL UNet.*teacher.kind = 'sd'"):
        load(dirs["sdxl"], kind="sd")


# ------------------------------------------------------------------------------------ memory levers


def _fwd_bwd(unet, cond, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g).requires_grad_(True)
    out = unet(x, torch.tensor([30, 700]), **unet_kwargs(cond)).sample
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.clone(), grads


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_grad_checkpointing_same_outputs_and_gradients(dirs, monkeypatch, name):
    """Trainable copy (generator / fake: parameter grads) and frozen teacher (input grad only)."""
    kind = "sdxl" if name == "sdxl" else "sd"
    t = load(dirs[name], kind=kind)
    cond = t.conditioner.encode(["a", "b"])
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    for trainable in (True, False):
        plain = copy.deepcopy(t.net).requires_grad_(trainable).train(trainable)
        ckpt = copy.deepcopy(plain)
        ckpt.enable_gradient_checkpointing()
        assert ckpt.is_gradient_checkpointing and not plain.is_gradient_checkpointing
        ref = _fwd_bwd(plain, cond)
        assert not calls
        got = _fwd_bwd(ckpt, cond)
        assert len(calls) > 0, "checkpointing enabled but never used"
        calls.clear()
        torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
        assert got[2].keys() == ref[2].keys() and (len(ref[2]) > 0) == trainable
        for k in ref[2]:
            torch.testing.assert_close(got[2][k], ref[2][k], rtol=1e-4, atol=1e-6)


def test_build_engine_enables_checkpointing_per_net():
    from sidscale.config import NetConfig
    from sidscale.distributed.engines import build_engine
    from sidscale.distributed.runtime import init_distributed
    from tests.helpers.inprocess import single_rank_environment

    with single_rank_environment():
        init_distributed()
        from sidscale.families.unet_vp.tiny import build_tiny_unet

        unet = build_tiny_unet(0, in_channels=4, sample_size=8).requires_grad_(False)
        ds = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
              "steps_per_print": 10**9}
        on, off = (build_engine(unet, NetConfig(grad_checkpointing=g), ds) for g in (True, False))
        assert on.module.is_gradient_checkpointing and not off.module.is_gradient_checkpointing


def test_sdpa_is_the_default_and_eager_matches(dirs):
    t = load(dirs["sd15"])
    assert attention_processors(t.net) == {"AttnProcessor2_0"}
    cond = t.conditioner.encode(["a", "b"])
    eager = load_teacher(TeacherConfig(kind="sd", path=str(dirs["sd15"]), dtype="fp32", resolution=RES,
                                      attention="eager"))
    assert attention_processors(eager.net) == {"AttnProcessor"}
    x, ts = torch.randn(2, 4, 8, 8), torch.tensor([5, 600])
    torch.testing.assert_close(eager.net(x, ts, **unet_kwargs(cond)).sample,
                               t.net(x, ts, **unet_kwargs(cond)).sample, rtol=1e-5, atol=1e-5)
    # the trainable copies inherit the processors (build_engine deep-copies the teacher UNet)
    assert attention_processors(copy.deepcopy(eager.net)) == {"AttnProcessor"}
    with pytest.raises(ConfigError, match="teacher.attention"):
        set_attention(t.net, "flash")


def test_channels_last_teacher_same_output(dirs):
    t = load(dirs["sd15"])
    cl = load_teacher(TeacherConfig(kind="sd", path=str(dirs["sd15"]), dtype="fp32", resolution=RES,
                                   channels_last=True))
    w = cl.net.conv_in.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    cond = t.conditioner.encode(["a", "b"])
    x, ts = torch.randn(2, 4, 8, 8), torch.tensor([5, 600])
    torch.testing.assert_close(cl.net(x, ts, **unet_kwargs(cond)).sample,
                               t.net(x, ts, **unet_kwargs(cond)).sample, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ 2-rank training

TRAIN = ["train.precision=fp32", "teacher.dtype=fp32", f"teacher.resolution={RES}", "train.global_batch=4",
         "train.micro_batch=2", "train.max_steps=2", "train.log_every=1", "train.preview_every=2",
         "train.ckpt_every=2", "eval.num_samples=0", "data.num_workers=1", "generator.lr=1e-3",
         "fake.lr=1e-3", "eval.teacher_steps=2"]


def _loss_scalars(run_dir) -> dict[str, list[float]]:
    """The loss curves rank 0 wrote to TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"] if "loss" in tag}


@pytest.mark.parametrize("name,extra,ranks", [
    # SD1.5 shape with all three activation-checkpointing switches on (the SD presets' setting)
    ("sd15", ["teacher.grad_checkpointing=true", "generator.grad_checkpointing=true",
              "fake.grad_checkpointing=true", "data.shards=indexed:toy", "train.export_at_end=true"], 1),
    ("sd21v", ["data.shards=indexed:toy", "train.export_at_end=false"], 1),
    # SDXL through the streaming loader on 2 ranks: tokenize runs in the workers and yields [B, 2, 77]
    pytest.param("sdxl", ["data.shards=toy", "train.export_at_end=true"], 2, marks=pytest.mark.slow),
])
def test_trains_two_steps(dirs, tmp_path, name, extra, ranks):
    """Each SD-shaped teacher trains through main(); one rank in-process where two ranks add nothing
    that the SDXL case and the trainer tests do not already cover."""
    from tests.helpers.inprocess import run_main

    kind = "sdxl" if name == "sdxl" else "sd"
    run = tmp_path / "run"
    overrides = TRAIN + extra + [f"teacher.kind={kind}", f"teacher.path={dirs[name]}"]
    if ranks == 2:
        run_trainer(run, overrides, timeout=300)
    else:
        proc = run_main(run, overrides + ["train.global_batch=2"])
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "checkpoints").is_dir() and (run / "samples" / "step_00000002.png").is_file()
    losses = _loss_scalars(run)
    assert len(losses) >= 2 and all(len(v) == 2 for v in losses.values()), losses
    assert all(torch.isfinite(torch.tensor(v)).all() for v in losses.values()), losses
    if name in ("sd15", "sdxl"):
        # the export is a pipeline directory plain diffusers loads (the student's UNet inside)
        import diffusers

        cls = diffusers.StableDiffusionXLPipeline if name == "sdxl" else diffusers.StableDiffusionPipeline
        pipe = cls.from_pretrained(run / "export", local_files_only=True)
        ours = diffusers.UNet2DConditionModel.from_pretrained(run / "export" / "unet").state_dict()
        assert all(torch.equal(v, ours[k]) for k, v in pipe.unet.state_dict().items())
        assert pipe.text_encoder is not None and pipe.vae is not None
    if name == "sdxl":
        from sidscale.sample import FewStepPipeline as OneStepPipeline

        pipe = OneStepPipeline.from_export(run / "export")
        assert isinstance(pipe.conditioner, SdxlConditioner)
        images = pipe(["a red circle", "a blue square"], [0, 1])
        assert images.shape == (2, 3, RES, RES) and torch.isfinite(images).all()
