"""Real-size architecture presets (meta device: no memory, no weights) and the SD config presets."""

from __future__ import annotations

import pytest

from sidscale.config import load_config, validate
from sidscale.errors import TeacherDirError
from sidscale.families.unet_vp.loading import load_teacher
from sidscale.families.unet_vp.presets import (
    PRESETS,
    build_text_encoders,
    build_unet,
    build_vae,
    count_parameters,
    unet_forward_flops,
)

# Published / method-page parameter counts (UNet, text encoder(s), VAE).
PARAMS = {
    "sd15": (859_520_964, [123_060_480], 83_653_863),
    "sd21": (865_910_724, [340_387_840], 83_653_863),
    "sd21_768": (865_910_724, [340_387_840], 83_653_863),
    "sdxl": (2_567_463_684, [123_060_480, 694_659_840], 83_653_863),
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts_match_published(name):
    unet, encoders, vae = PARAMS[name]
    built = build_unet(name, "meta")
    assert next(built.parameters()).is_meta
    assert count_parameters(built) == unet
    assert [count_parameters(m) for m in build_text_encoders(name)] == encoders
    assert count_parameters(build_vae(name)) == vae


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_unet_flops_match_method_page(name):
    """Batch 1, 77 tokens, native latent size (64x64 SD1.5, 128x128 SDXL)."""
    assert unet_forward_flops(name) / 1e12 == pytest.approx(PRESETS[name].published["unet_tflop"], abs=5e-4)


@pytest.mark.parametrize("name,kind,res,pred", [
    ("sd15", "sd", 512, "auto"), ("sd21", "sd", 512, "epsilon"),
    ("sd21_768", "sd", 768, "v_prediction"), ("sdxl", "sdxl", 1024, "auto"),
])
def test_sd_presets_load_with_method_defaults(name, kind, res, pred):
    cfg = load_config(name)
    validate(cfg, world_size=8)
    t = cfg.teacher
    assert (t.kind, t.resolution, t.prediction_type, t.dtype) == (kind, res, pred, "bf16")
    # checkpointing only where memory needs it (SDXL): the SD1/2 defaults fit without it
    assert t.grad_checkpointing == (name == "sdxl")
    for net in (cfg.generator, cfg.fake):
        assert net.lr == 1e-6 and net.betas == (0.0, 0.999) and net.grad_checkpointing == (name == "sdxl")
    m = cfg.method
    assert m.cfg_train_fake == m.cfg_eval_fake == m.cfg_eval_real == 1.5
    assert cfg.train.global_batch == 512 and cfg.train.micro_batch in (2, 4) and cfg.train.precision == "bf16"
    assert cfg.deepspeed.config == "ds_configs/zero2.json"
    assert t.path.startswith("/path/to/") and cfg.data.shards.startswith("/path/to/")
    # the placeholder teacher path is refused with a message that says what to do
    with pytest.raises(TeacherDirError, match="placeholder"):
        load_teacher(t)


@pytest.mark.parametrize("name", ["sd15", "sd21", "sd21_768", "sdxl"])
def test_sd_preset_defaults_fit_a_40gb_gpu_by_the_memory_plan(name):
    """The presets' micro-batch and checkpointing choices, against the memory plan (8 GPUs, ZeRO-2)."""
    from sidscale.perf.memory_plan import GIB, PlanInput, plan

    cfg = load_config(name)
    assert cfg.generator.grad_checkpointing == cfg.fake.grad_checkpointing == cfg.teacher.grad_checkpointing
    inp = PlanInput(name, gpus=8, zero=2, micro_batch=cfg.train.micro_batch, precision=cfg.train.precision,
                    teacher_dtype=cfg.teacher.dtype, grad_checkpointing=cfg.teacher.grad_checkpointing,
                    accumulation=cfg.train.global_batch // (cfg.train.micro_batch * 8))
    assert plan(inp, micro_batch=cfg.train.micro_batch).total < 40 * GIB
