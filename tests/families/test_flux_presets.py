"""The published FLUX.1-dev architecture (meta device: no memory, no weights), its config preset, its
memory plan, and the CPU-sized flux_tiny through the benchmark.

Independent references: the FLUX.1-dev parameter count measured on the released checkpoint that the
docs/flow_matching.md table 5.1 quotes, the FLUX VAE factors of its table 4.2, a
hand-written matmul count of a FLUX transformer forward, the closed-form model-state bytes, and a
network-call-by-network-call FLOP count of one SiD iteration without true CFG.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from sidscale.families.flux.presets import (
    FLUX_PRESETS,
    build_flux_text_encoders,
    build_flux_transformer,
    build_flux_vae,
    get_flux_preset,
    transformer_forward_flops,
)
from sidscale.families.unet_vp.presets import count_parameters

GIB = 2**30


def _agrees_with_doc(count: int, billions: float, gib: float) -> bool:
    """The doc rounds the measured count to its last shown digit (and the bf16 bytes to 0.01 GiB)."""
    digits = len(str(billions).split(".")[1])
    return round(count / 1e9, digits) == billions and round(2 * count / GIB, 2) == gib


def test_flux_dev_parameters_match_the_released_count():
    net = build_flux_transformer("flux_dev")
    assert next(net.parameters()).is_meta
    params = count_parameters(net)
    assert _agrees_with_doc(params, 11.901, 22.17), params  # docs/flow_matching.md 5.1
    assert sum(b.numel() for b in net.buffers()) == 0  # RoPE from ids: no position table
    p = get_flux_preset("flux_dev")
    assert params == p.published["transformer_params"]
    cfg = p.transformer
    assert sum(cfg["axes_dims_rope"]) == cfg["attention_head_dim"] and cfg["guidance_embeds"]
    assert net.time_text_embed.guidance_embedder is not None
    assert p.latent_shape == (64, 128, 128) and p.kind == "flux" and p.t5_tokens == 512


def test_flux_text_encoders_and_vae_match_released_counts():
    from sidscale.families.sd3.presets import get_dit_preset

    p = get_flux_preset("flux_dev")
    clip, t5 = build_flux_text_encoders("flux_dev")
    assert (type(clip).__name__, type(t5).__name__) == ("CLIPTextModel", "T5EncoderModel")
    assert _agrees_with_doc(count_parameters(t5), 4.762, 8.87)
    # CLIP-L without the 768 x 768 text projection SD3 carries (FLUX reads the pooler output)
    assert count_parameters(clip) == get_dit_preset("sd35_large").published["clip_l_params"] - 768 * 768
    vae = build_flux_vae("flux_dev")
    assert _agrees_with_doc(count_parameters(vae), 0.084, 0.16)
    assert (vae.config.scaling_factor, vae.config.shift_factor, vae.config.latent_channels) == (0.3611, 0.1159, 16)
    assert [count_parameters(clip), count_parameters(t5), count_parameters(vae)] == [
        p.published["clip_l_params"], p.published["t5_params"], p.published["vae_params"]]
    cfg = p.transformer
    assert cfg["pooled_projection_dim"] == clip.config.hidden_size and cfg["joint_attention_dim"] == t5.config.d_model
    assert cfg["in_channels"] == 4 * vae.config.latent_channels  # 2x2 packing


def flux_forward_flops(cfg: dict, batch: int, t5_tokens: int, latent: int = 128) -> int:
    """Matmul FLOPs (2 per multiply-add) of one FLUX transformer forward, written from the architecture."""
    heads, d = cfg["num_attention_heads"], cfg["attention_head_dim"]
    width = heads * d
    n_img, n_txt = (latent // 2) ** 2, t5_tokens
    n = n_img + n_txt

    def linear(tokens: int, fan_in: int, fan_out: int) -> int:
        return 2 * batch * tokens * fan_in * fan_out

    def attention(tokens: int) -> int:  # Q K^T and A V
        return 2 * (2 * batch * heads * tokens * tokens * d)

    f = linear(n_img, cfg["in_channels"], width) + linear(n_txt, cfg["joint_attention_dim"], width)  # embedders
    embeds = 2 if cfg["guidance_embeds"] else 1  # timestep (+ guidance) MLPs on 256 sinusoidal features
    f += embeds * (linear(1, 256, width) + linear(1, width, width))
    f += linear(1, cfg["pooled_projection_dim"], width) + linear(1, width, width)  # pooled-text MLP
    for _ in range(cfg["num_layers"]):  # double-stream: separate weights for the two streams, joint attention
        f += 2 * linear(1, width, 6 * width)  # adaLN-zero of both streams
        f += 3 * linear(n_img, width, width) + 3 * linear(n_txt, width, width) + attention(n)
        f += linear(n_img, width, width) + linear(n_txt, width, width)  # output projections
        f += 2 * linear(n_img, width, 4 * width) + 2 * linear(n_txt, width, 4 * width)  # MLPs
    for _ in range(cfg["num_single_layers"]):  # single-stream: one sequence, parallel attention + MLP
        f += linear(1, width, 3 * width) + 3 * linear(n, width, width) + attention(n)
        f += linear(n, width, 4 * width) + linear(n, 5 * width, width)  # MLP in, fused output projection
    f += linear(1, width, 2 * width) + linear(n_img, width, cfg["in_channels"])  # final norm and projection
    return f


@pytest.mark.parametrize("batch,t5_tokens", [(1, 512), (2, 256)])
def test_flux_transformer_flops_match_the_hand_count(batch, t5_tokens):
    counted = transformer_forward_flops("flux_dev", batch, t5_tokens)
    assert counted == flux_forward_flops(get_flux_preset("flux_dev").transformer, batch, t5_tokens)
    if (batch, t5_tokens) == (1, 512):
        assert counted / 1e12 == pytest.approx(get_flux_preset("flux_dev").published["transformer_tflop"], abs=5e-4)


def test_flux_dev_config_preset_is_sid_dit_with_the_guidance_embedding():
    """docs/flow_matching.md 1.2-1.7: the SiD-DiT recipe, ZeRO-3, the released FLUX code's guidance coupling
    (mode official) at its default scales 1: teacher and fake embedding 1 without true CFG, generator 1.0."""
    import math

    from sidscale.config import load_config, validate
    from sidscale.families.flux.adapter import guidance_from_config

    cfg = load_config("flux_dev")
    validate(cfg, world_size=8)
    m, t = cfg.method, cfg.teacher
    assert (t.kind, t.resolution, t.max_sequence_length, t.t5) == ("flux", 1024, 512, True)
    assert (m.cfg_train_fake, m.cfg_eval_fake, m.cfg_eval_real) == (1.0, 1.0, 1.0)
    assert cfg.distilled_guidance.mode == "official"
    assert guidance_from_config(cfg) == {"teacher": None, "fake": None, "generator": 1.0}
    assert (m.generator_steps, m.gen_weighting, m.gen_loss_scale, m.alpha, m.sigma_init) == (
        4, "one_minus_sigma", 100.0, 1.0, 1.0)
    assert (m.sigma_logit_mean, m.sigma_logit_std) == (pytest.approx(math.log(2)), 1.6)
    assert (cfg.generator.lr, tuple(cfg.generator.betas), cfg.train.global_batch) == (1e-6, (0.0, 0.999), 256)
    assert t.grad_checkpointing and cfg.generator.grad_checkpointing and cfg.fake.grad_checkpointing
    assert cfg.deepspeed.config == "ds_configs/zero3.json"


def test_memory_plan_tool_plans_flux_dev_on_its_recipe():
    """tools/memory_plan.py --preset flux_dev: model states in closed form, both text encoders (T5-XXL
    included) replicated, one branch per net (no true CFG), 19 + 38 checkpointed blocks; and the method
    page's verdict (5.4): with the teacher replicated FLUX does not fit 8 x 80 GB even with ZeRO-3."""
    from sidscale.families.presets import latent_shape, preset_nets
    from sidscale.perf.preset_costs import checkpoint_blocks
    from tools.memory_plan import main as memory_plan_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert memory_plan_main(["--preset", "flux_dev", "--zero", "3", "--grad-checkpointing", "--json"]) == 0
    rec = json.loads(out.getvalue().strip().splitlines()[-1])
    assert rec["inputs"]["cfg_scales"] == [1.0, 1.0, 1.0]
    p, n = get_flux_preset("flux_dev").published, 8
    P, t = p["transformer_params"], rec["terms_gib"]
    for net in ("generator", "fake"):
        assert t[f"{net}_params"] * GIB == pytest.approx(2 * P / n)
        assert t[f"{net}_adam_states"] * GIB == pytest.approx(8 * P / n)
    assert t["teacher_net"] * GIB == pytest.approx(2 * P)
    assert t["text_encoders"] * GIB == pytest.approx(2 * (p["clip_l_params"] + p["t5_params"]))
    assert rec["total_gib"] > 80  # docs/flow_matching.md 5.4: "FLUX, ZeRO-3, teacher replicated: does not fit"
    assert checkpoint_blocks("flux_dev") == 19 + 38
    assert preset_nets("flux_dev").name == "flux" and latent_shape("flux_dev") == (16, 128, 128)


def test_flux_tiny_bench_counts_one_branch_per_network_call():
    """tools/bench.py --preset flux_tiny as one in-process rank: the real Trainer on the flux_dev recipe
    (K = 1 for the bench). Without true CFG every teacher / fake call is ONE branch of the batch."""
    from diffusers import FluxTransformer2DModel

    from sidscale.families.flux.adapter import FluxVelocity
    from sidscale.families.flux.presets import flux_preset
    from sidscale.families.presets import build_preset_teacher
    from sidscale.perf.flops import count_flops
    from tests.helpers.inprocess import single_rank_environment
    from tools.bench import main as bench_main

    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls on a shared 2-core machine (see tests/families/test_perf_sd3.py)
    try:
        out = io.StringIO()
        with single_rank_environment(), contextlib.redirect_stdout(out):
            code = bench_main(["--preset", "flux_tiny", "--device", "cpu", "--zero", "2", "--precision", "fp32",
                               "--micro-batch", "1", "--steps", "1", "--warmup", "0", "--peak-tflops", "1.0"])
        assert code == 0
        rec = json.loads([line for line in out.getvalue().splitlines() if line.startswith("{")][0])
        assert rec["config"] == "flux_tiny/zero2/fp32/mb1x1" and rec["s_per_iter"] > 0

        p = flux_preset("flux_tiny")
        assert rec["net_fwd_flops_per_sample"] == flux_forward_flops(p.transformer, 1, p.t5_tokens, latent=32)
        teacher = build_preset_teacher("flux_tiny", "cpu", "fp32")
        x, sigma = torch.randn(1, 16, 32, 32), torch.full((1,), 0.5)
        cond = teacher.conditioner.encode(["a red circle"])
        trainable = FluxTransformer2DModel(**p.transformer).requires_grad_(True)
        with torch.no_grad():
            f = count_flops(lambda: FluxVelocity(teacher.net, guidance=3.5)(x, sigma, cond))[0]
        t = count_flops(lambda: FluxVelocity(trainable, guidance=1.0)(x, sigma, cond).square().sum().backward())[0]
        r = count_flops(lambda: FluxVelocity(teacher.net, guidance=3.5)(x.clone().requires_grad_(True), sigma,
                                                                          cond).square().sum().backward())[0]
        e = count_flops(lambda: teacher.conditioner.encode(["a blue square"]))[0]
    finally:
        torch.set_num_threads(saved)
    assert f == rec["net_fwd_flops_per_sample"] and t > 2 * f and f < r < t
    # fake step: G (no grad) + the fake net's forward and backward; generator step: G's forward and
    # backward + the teacher and the frozen fake net, one branch each (true CFG would make it 2 + 2)
    assert rec["flops_per_iter"] == 2 * e + f + 2 * t + 2 * r


def test_presets_registry():
    assert set(FLUX_PRESETS) == {"flux_dev"}
    with pytest.raises(KeyError, match="flux_dev"):
        get_flux_preset("flux_pro")


def test_random_flux_tiny_teacher_is_a_flux_pipeline_directory(tmp_path):
    """tools/write_random_teacher.py --preset flux_tiny: the trainer's loader and diffusers' FluxPipeline
    read the same directory, with the preset's weights and the same conditioning."""
    from diffusers import FluxPipeline

    from sidscale.config import load_config
    from sidscale.families import family_for_kind
    from sidscale.families.presets import build_preset_net
    from tools.write_random_teacher import main as write_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        args = ["--preset", "flux_tiny", "--out", str(tmp_path / "t"), "--dtype", "fp32", "--seed", "3"]
        assert write_main(args) == 0
    info = json.loads(out.getvalue().strip().splitlines()[-1])
    assert (info["kind"], info["resolution"], info["config"], info["network"]) == ("flux", 256, "flux_dev",
                                                                                   "transformer")
    cfg = load_config(info["config"], [f"teacher.path={tmp_path / 't'}", "teacher.resolution=256",
                                       "teacher.dtype=fp32", "teacher.max_sequence_length=64"])
    teacher = family_for_kind("flux").load_teacher(cfg, "cpu")
    want = build_preset_net("flux_tiny", "cpu", seed=3).state_dict()
    got = teacher.net.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], v) for k, v in want.items())
    assert teacher.latent_shape == (16, 32, 32) and teacher.scaling_factor == pytest.approx(0.3611)
    pipe = FluxPipeline.from_pretrained(tmp_path / "t", local_files_only=True)
    assert pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.max_shift == 1.15  # FLUX's
    with torch.no_grad():
        pe, pooled, _ = pipe.encode_prompt(["a red circle"], None, max_sequence_length=64)
    cond = teacher.conditioner.encode(["a red circle"])
    assert torch.equal(cond["encoder_hidden_states"], pe) and torch.equal(cond["pooled_projections"], pooled)
