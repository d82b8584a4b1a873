"""The published SD3 / SD3.5 architectures (meta device: no memory, no weights) and their memory plan.

Independent references: the parameter counts measured on the released checkpoints that the method
page quotes (docs/flow_matching.md table 5.1, 3-4 significant digits), a hand-written matmul count
of an MMDiT forward, the closed-form model-state bytes, and the fit verdicts of docs/flow_matching.md 5.4.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from sidscale.families.sd3.presets import (
    DIT_PRESETS,
    build_sd3_text_encoders,
    build_sd3_transformer,
    build_sd3_vae,
    get_dit_preset,
    transformer_forward_flops,
)
from sidscale.families.unet_vp.presets import count_parameters

GIB = 2**30
# docs/flow_matching.md table 5.1: (billions of parameters, millions of pos_embed buffer elements, bf16 GiB)
DOC_TRANSFORMER = {"sd3_medium": (2.028, 56.6, 3.78), "sd35_medium": (2.243, 226.5, 4.18),
                   "sd35_large": (8.057, 89.7, 15.01)}
# CLIP-L with projection, bigG with projection, T5-v1.1-XXL encoder, 16-channel VAE: (B params, bf16 GiB)
DOC_ENCODERS = [(0.124, 0.23), (0.695, 1.29), (4.762, 8.87)]
DOC_VAE = (0.084, 0.16)


def _agrees_with_doc(count: int, billions: float, gib: float) -> bool:
    """The doc rounds the measured count to its last shown digit (and the bf16 bytes to 0.01 GiB)."""
    digits = len(str(billions).split(".")[1])
    return round(count / 1e9, digits) == billions and round(2 * count / GIB, 2) == gib


@pytest.mark.parametrize("name", sorted(DIT_PRESETS))
def test_transformer_parameters_match_released_counts(name):
    billions, buffer_m, gib = DOC_TRANSFORMER[name]
    net = build_sd3_transformer(name)
    assert next(net.parameters()).is_meta
    params = count_parameters(net)
    buffers = sum(b.numel() for b in net.buffers())
    assert _agrees_with_doc(params, billions, gib), params
    assert round(buffers / 1e6, 1) == buffer_m
    published = get_dit_preset(name).published
    assert (params, buffers) == (published["transformer_params"], published["pos_embed_buffer"])
    # the pos_embed buffer is the fixed pos_embed_max_size^2 x width sin-cos table
    cfg = get_dit_preset(name).transformer
    assert buffers == cfg["pos_embed_max_size"] ** 2 * cfg["num_attention_heads"] * cfg["attention_head_dim"]


def test_text_encoders_and_vae_match_released_counts():
    preset = get_dit_preset("sd35_medium")
    encoders = build_sd3_text_encoders("sd35_medium")
    assert [type(e).__name__ for e in encoders] == ["CLIPTextModelWithProjection"] * 2 + ["T5EncoderModel"]
    counts = [count_parameters(e) for e in encoders]
    for count, (billions, gib) in zip(counts, DOC_ENCODERS, strict=True):
        assert _agrees_with_doc(count, billions, gib), count
    vae = build_sd3_vae("sd35_medium")
    assert _agrees_with_doc(count_parameters(vae), *DOC_VAE)
    assert vae.quant_conv is None and vae.post_quant_conv is None and vae.config.latent_channels == 16
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (1.5305, 0.0609)
    p = preset.published
    assert counts == [p["clip_l_params"], p["clip_g_params"], p["t5_params"]]
    assert count_parameters(vae) == p["vae_params"]
    # the transformer's input widths are what the encoders produce (docs/flow_matching.md 4.3)
    cfg = preset.transformer
    assert cfg["pooled_projection_dim"] == sum(e.config.projection_dim for e in encoders[:2])
    assert cfg["joint_attention_dim"] == encoders[2].config.d_model
    assert preset.latent_shape == (16, 128, 128)
    assert cfg["pos_embed_max_size"] >= preset.latent_size // cfg["patch_size"]


def test_unknown_preset_is_refused_with_the_choices():
    from sidscale.families.presets import build_preset_unet, latent_shape, preset_nets

    with pytest.raises(KeyError, match="sd35_large"):
        get_dit_preset("sd4")
    with pytest.raises(ValueError, match="sd35_large"):
        preset_nets("sd4")
    with pytest.raises(ValueError, match="has no UNet"):  # the benchmark's UNet builder
        build_preset_unet("sd35_large", "meta")
    assert latent_shape("sd35_large") == (16, 128, 128) and latent_shape("sdxl") == (4, 128, 128)


def mmdit_forward_flops(cfg: dict, batch: int, t5_tokens: int, latent: int = 128) -> int:
    """Matmul FLOPs (2 per multiply-add) of one SD3 transformer forward, written from the architecture."""
    heads, d = cfg["num_attention_heads"], cfg["attention_head_dim"]
    width, p, layers = heads * d, cfg["patch_size"], cfg["num_layers"]
    n_img, n_txt = (latent // p) ** 2, 77 + t5_tokens

    def linear(tokens: int, fan_in: int, fan_out: int) -> int:
        return 2 * batch * tokens * fan_in * fan_out

    def attention(tokens: int) -> int:  # Q K^T and A V
        return 2 * (2 * batch * heads * tokens * tokens * d)

    f = linear(n_img, cfg["in_channels"] * p * p, width)  # patch embedding (a stride-p conv)
    f += linear(1, 256, width) + linear(1, width, width)  # timestep MLP
    f += linear(1, cfg["pooled_projection_dim"], width) + linear(1, width, width)  # pooled-text MLP
    f += linear(n_txt, cfg["joint_attention_dim"], width)  # context embedder
    for i in range(layers):
        last, dual = i == layers - 1, i in cfg["dual_attention_layers"]
        # adaLN modulation: image 6 (9 with the second attention), text 6 (last block: 2, continuous norm)
        f += linear(1, width, (9 if dual else 6) * width) + linear(1, width, (2 if last else 6) * width)
        f += 3 * linear(n_img, width, width) + 3 * linear(n_txt, width, width)  # q, k, v of both streams
        f += attention(n_img + n_txt)  # joint attention over the concatenated tokens
        f += linear(n_img, width, width) + (0 if last else linear(n_txt, width, width))  # output projections
        if dual:  # SD3.5 MMDiT-X: a second, image-only self-attention
            f += 4 * linear(n_img, width, width) + attention(n_img)
        f += 2 * linear(n_img, width, 4 * width) + (0 if last else 2 * linear(n_txt, width, 4 * width))  # MLPs
    f += linear(1, width, 2 * width) + linear(n_img, width, p * p * cfg["out_channels"])  # final layer
    return f


@pytest.mark.parametrize("name,batch,t5_tokens", [
    ("sd3_medium", 1, 77), ("sd35_medium", 1, 77), ("sd35_large", 1, 77), ("sd35_medium", 2, 256),
])
def test_transformer_flops_match_the_hand_count(name, batch, t5_tokens):
    """FlopCounterMode counts exactly the matmuls, convs and attention, so the two agree to the FLOP."""
    counted = transformer_forward_flops(name, batch, t5_tokens)
    assert counted == mmdit_forward_flops(get_dit_preset(name).transformer, batch, t5_tokens)
    if (batch, t5_tokens) == (1, 77):
        assert counted / 1e12 == pytest.approx(get_dit_preset(name).published["transformer_tflop"], abs=5e-4)


# --- memory plan (sidscale/perf/memory_plan.py) at 1024 px on 8 x 80 GB, checkpointing on -------------

@pytest.fixture(scope="module")
def sd3_plans():
    """One plan per case (the meta-device activation measurements are cached across them)."""
    from sidscale.perf.memory_plan import PlanInput, plan

    def make(name: str, zero: int, mb: int | None = None):
        inp = PlanInput(name, gpus=8, zero=zero, micro_batch=mb or 1, precision="bf16",
                        grad_checkpointing=True, gpu_mem_gib=80.0)
        return plan(inp, micro_batch=mb)

    return {("sd35_medium", 2): make("sd35_medium", 2), ("sd35_large", 3): make("sd35_large", 3),
            ("sd35_medium", 2, 4): make("sd35_medium", 2, 4), ("sd35_large", 2, 1): make("sd35_large", 2, 1)}


@pytest.mark.parametrize("name,zero", [("sd35_medium", 2), ("sd35_large", 3)])
def test_memory_plan_model_states_match_the_closed_form(sd3_plans, name, zero):
    """Per net and parameter: 2 (bf16 weights) + 4 (fp32 master) + 8 (Adam m, v) + the gradient, which is
    4 (fp32: sidscale accumulates in fp32) where the textbook 16 B/param has 2; split per ZeRO stage.
    Teacher, text encoders (with T5) and the pos_embed buffers are replicated."""
    result = sd3_plans[(name, zero)]
    t, n = result.terms, 8
    p = get_dit_preset(name).published
    P, buf = p["transformer_params"], p["pos_embed_buffer"]
    text = p["clip_l_params"] + p["clip_g_params"] + p["t5_params"]
    for net in ("generator", "fake"):
        assert t[f"{net}_params"] == 2 * P / (n if zero == 3 else 1)
        assert t[f"{net}_fp32_master"] == 4 * P / n
        assert t[f"{net}_adam_states"] == 8 * P / n
        assert t[f"{net}_buffers"] == 4 * buf  # fp32 in the engines, whole on every rank
        if zero == 3:  # ZeRO-3: the fp32 gradient partition is allocated at start-up
            assert t[f"{net}_grads"] == 4 * P / n
    if zero == 2:  # ZeRO-2: the fp32 gradient partition exists from the backward to the step
        assert result.phases["gen_backward"]["grads"] == 4 * P / n
    assert t["ema_fp32"] == 4 * P / n
    assert t["teacher_net"] == 2 * P and t["teacher_buffers"] == 2 * buf
    assert t["text_encoders"] == 2 * text
    # docs/flow_matching.md 5.4's per-GPU budget: teacher 15.0 GiB bf16 (SD3.5-L), text encoders 10.4 GiB
    assert t["text_encoders"] / GIB == pytest.approx(10.4, abs=0.05)


@pytest.mark.parametrize("name", ["sd35_medium", "sd35_large"])
def test_memory_plan_checkpointed_activations_are_the_block_boundaries(sd3_plans, name):
    """With checkpointing, a forward keeps each JointTransformerBlock's inputs (image + text tokens x
    width, bf16) plus the un-checkpointed final layer: the measured bytes per sample lie in between."""
    from sidscale.perf.preset_costs import activation_bytes_per_sample, checkpoint_blocks

    preset = get_dit_preset(name)
    cfg = preset.transformer
    width, layers = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["num_layers"]
    n_img = (preset.latent_size // cfg["patch_size"]) ** 2
    boundaries = layers * (n_img + 77 + preset.t5_tokens) * width * 2
    assert checkpoint_blocks(name) == layers
    for trainable in (True, False):
        got = activation_bytes_per_sample(name, "bf16", trainable, True)
        assert boundaries < got < boundaries + 4 * n_img * width * 2, (trainable, got / GIB)


def test_memory_plan_fit_verdicts_agree_with_the_method_page(sd3_plans):
    """docs/flow_matching.md 5.4: SD3.5-M with ZeRO-2 fits 8 x 80 GB up to micro-batch 4; SD3.5-L does not
    fit with ZeRO-2, and with ZeRO-3 (teacher replicated) only at small micro-batches."""
    assert sd3_plans[("sd35_medium", 2)].max_micro_batch >= 4
    assert sd3_plans[("sd35_medium", 2, 4)].total < 80 * GIB
    assert sd3_plans[("sd35_large", 2, 1)].total > 80 * GIB
    # The page says "mb <= 2 safe" keeping 10-15 % for fragmentation: the plan's budget keeps it now (90 % of
    # the card less 2 GiB outside the allocator), so with the teacher replicated only small micro-batches fit.
    # ZeRO-3 previews swap the EMA into the partitioned generator and decode one image at a time, so the peak
    # is training's.
    large = sd3_plans[("sd35_large", 3)]
    detail = (f"max mb {large.max_micro_batch}, {large.total / GIB:.3f} of {large.budget / GIB:.3f} GiB, peak "
              f"{large.peak_phase}: " + ", ".join(f"{k} {v / GIB:.3f}" for k, v in sorted(large.terms.items())))
    assert 1 <= large.max_micro_batch <= 2 and 0.8 * 80 * GIB < large.total <= large.budget, detail
    assert large.peak_phase != "preview"


def test_memory_plan_tool_accepts_sd3_presets(sd3_plans):
    """tools/memory_plan.py --preset sd35_large prints the same plan (in process: the caches are shared)."""
    from tools.memory_plan import main as memory_plan_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert memory_plan_main(["--preset", "sd35_large", "--zero", "3", "--grad-checkpointing", "--json"]) == 0
    rec = json.loads(out.getvalue().strip().splitlines()[-1])
    expected = sd3_plans[("sd35_large", 3)]
    assert rec["total_gib"] == pytest.approx(expected.total / GIB)
    assert rec["max_micro_batch"] == expected.max_micro_batch and rec["peak_phase"] == expected.peak_phase
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        memory_plan_main(["--preset", "sd35_large", "--measure"])


def test_activation_measurement_ignores_a_zero3_linear_left_in_the_process():
    """An in-process ZeRO-3 engine leaves DeepSpeed's memory-efficient F.linear wrapper in place for good;
    the plan's meta measurement uses torch's own, so a plan does not depend on what the process ran before."""
    import torch
    import torch.nn.functional as F
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    from sidscale.families.presets import build_preset_net
    from sidscale.perf.activations import net_saved_bytes

    # frozen weights, as the teacher and the fake net in the generator step (the wrapper saved 36 % more here)
    net = build_preset_net("sd3_tiny", "meta").to(torch.bfloat16).requires_grad_(False)
    before = net_saved_bytes("sd3_tiny", net, 2, torch.bfloat16, False)
    saved = F.linear
    F.linear = zero3_linear_wrap
    try:
        during = net_saved_bytes("sd3_tiny", net, 2, torch.bfloat16, False)
        assert F.linear is zero3_linear_wrap  # restored to what the process had
    finally:
        F.linear = saved
    assert during == before
