"""The benchmark, the memory plan and the random-weight teacher writer on the CPU-sized SD3 preset
``sd3_tiny`` (SD3.5-Medium's MMDiT-X at width 64, 4 blocks, 256 px; sidscale/families/presets.py).

Independent references: torch's own FlopCounterMode on a plain ``SD3Transformer2DModel`` call and the
hand count of an MMDiT forward (tests/families/test_sd3_presets.py); the network calls the SiD-DiT method
makes per iteration, each counted on its own; diffusers' ``StableDiffusion3Pipeline`` (loading the
written directory, ``encode_prompt``); the allocator's measured peak of real trainer iterations.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from safetensors import safe_open

from tests.helpers.inprocess import single_rank_environment


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine two spinning OpenMP threads make these small
    matmuls ~30x slower (measured); the count of FLOPs does not depend on it."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _json_line(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][0])


def _flops(fn) -> int:
    from sidscale.perf.flops import count_flops

    return count_flops(fn)[0]


def test_sd3_tiny_bench_counts_the_forward_and_exactly_the_method_network_calls(one_thread):
    """tools/bench.py --preset sd3_tiny as one in-process rank (1 timed + 1 counted iteration)."""
    from diffusers import SD3Transformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    from sidscale.families.presets import build_preset_teacher
    from sidscale.families.sd3.presets import dit_preset
    from tests.families.test_sd3_presets import mmdit_forward_flops
    from tools.bench import main as bench_main

    out = io.StringIO()
    with single_rank_environment(), contextlib.redirect_stdout(out):
        code = bench_main(["--preset", "sd3_tiny", "--device", "cpu", "--zero", "2", "--precision", "fp32",
                           "--micro-batch", "1", "--steps", "1", "--warmup", "0", "--peak-tflops", "1.0"])
    assert code == 0
    rec = _json_line(out.getvalue())
    assert rec["config"] == "sd3_tiny/zero2/fp32/mb1x1" and rec["preset"] == "sd3_tiny" and rec["steps"] == 1
    assert rec["s_per_iter"] > 0 and 0 < rec["mfu"] < 1

    # One forward per sample: torch's plain FlopCounterMode on a plain transformer call (meta device:
    # SDPA runs the math path there, so attention is counted as its two matmuls), inputs built here
    # from the preset's config, and the hand count of the MMDiT's matmuls at 32x32 latents.
    preset = dit_preset("sd3_tiny")
    cfg = preset.transformer
    with torch.device("meta"):
        net = SD3Transformer2DModel(**cfg)
        kwargs = {"hidden_states": torch.zeros(1, 16, 32, 32),
                  "encoder_hidden_states": torch.zeros(1, 77 + 77, cfg["joint_attention_dim"]),
                  "pooled_projections": torch.zeros(1, cfg["pooled_projection_dim"]), "timestep": torch.ones(1)}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(**kwargs, return_dict=False)
    forward = counter.get_total_flops()
    assert rec["net_fwd_flops_per_sample"] == forward == mmdit_forward_flops(cfg, 1, 77, latent=32)

    # One iteration (K = 1, CFG 4.5 on all three nets: both branches run), network call by network call:
    # fake step  = G forward without grad (F) + the fake net's forward and backward on 2 samples (2 T);
    # gen step   = G's forward and backward (T) + teacher and frozen fake net on 2 samples each, with the
    #              gradient to their input only (4 R); plus the prompt encoding of each phase (2 E; the
    #              empty prompt's encoding is cached). Losses, Adam, EMA: element-wise, not counted.
    teacher = build_preset_teacher("sd3_tiny", "cpu", "fp32")
    x = torch.randn(1, *preset.latent_shape)
    cond = teacher.conditioner.encode(["a red circle"])
    sigma = torch.full((1,), 0.5)

    def call(net, x_in):
        return net(hidden_states=x_in, encoder_hidden_states=cond["encoder_hidden_states"],
                   pooled_projections=cond["pooled_projections"], timestep=1000 * sigma, return_dict=False)[0]

    frozen = teacher.net
    trainable = SD3Transformer2DModel(**cfg).requires_grad_(True)
    with torch.no_grad():
        f = _flops(lambda: call(frozen, x))
    t = _flops(lambda: call(trainable, x).square().sum().backward())
    r = _flops(lambda: call(frozen, x.clone().requires_grad_(True)).square().sum().backward())
    e = _flops(lambda: teacher.conditioner.encode(["a blue square"]))
    assert f == forward and t > 2 * f and f < r < t
    assert rec["flops_per_iter"] == 2 * e + f + 3 * t + 4 * r
    assert rec["net_fwd_equivalents_per_sample"] == pytest.approx(rec["flops_per_iter"] / forward)


@pytest.fixture(scope="module")
def sd3_tiny_dir(tmp_path_factory):
    from sidscale.testing.random_teacher import write_random_teacher

    path = tmp_path_factory.mktemp("random-sd3") / "teacher"
    with torch.random.fork_rng(devices=[]):
        info = write_random_teacher(path, "sd3_tiny", dtype="bf16", seed=3)
    return path, info


def test_random_sd3_tiny_teacher_loads_through_the_family_and_diffusers(sd3_tiny_dir, one_thread):
    from diffusers import StableDiffusion3Pipeline

    from sidscale.config import load_config
    from sidscale.families import family_for_kind
    from sidscale.families.presets import build_preset_net
    from sidscale.families.sd3.presets import dit_preset
    from sidscale.testing.random_teacher import read_info

    path, info = sd3_tiny_dir
    assert read_info(path) == info
    assert (info["kind"], info["resolution"], info["config"], info["network"]) == ("sd3", 256, "sd35_medium",
                                                                                   "transformer")
    for sub in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder_3/model.safetensors"):
        with safe_open(str(path / sub), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}, sub  # noqa: SIM118

    # the trainer's loading path, with the preset config the directory names
    cfg = load_config(info["config"], [f"teacher.path={path}", f"teacher.resolution={info['resolution']}",
                                       "teacher.dtype=fp32"])
    teacher = family_for_kind(info["kind"]).load_teacher(cfg, "cpu")
    want = build_preset_net("sd3_tiny", "cpu", seed=3)  # the seed's weights, rounded to bf16 by the save
    got_sd, want_sd = teacher.net.state_dict(), want.state_dict()
    assert got_sd.keys() == want_sd.keys()
    for k, v in want_sd.items():
        assert torch.equal(got_sd[k], v.to(torch.bfloat16).float()), k
    assert sum(p.numel() for p in teacher.net.parameters()) == info["parameters"]["transformer"]
    assert info["buffers"]["transformer"] == sum(b.numel() for b in want.buffers())  # pos_embed: 32^2 x 64
    assert teacher.latent_shape == dit_preset("sd3_tiny").latent_shape == (16, 32, 32)
    assert (teacher.scaling_factor, teacher.shift_factor) == (1.5305, 0.0609) and teacher.conditioner.t5

    # diffusers reads the same directory as a StableDiffusion3Pipeline; its encode_prompt is the
    # conditioning the trainer computes (CLIP-L | CLIG-G penultimate, zero-padded, then T5; pooled)
    pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=torch.float32)
    norm = lambda v: tuple(v) if isinstance(v, list | tuple) else v  # noqa: E731 (JSON turns tuples into lists)
    assert {k: norm(pipe.transformer.config[k]) for k in dit_preset("sd3_tiny").transformer} == \
           {k: norm(v) for k, v in dit_preset("sd3_tiny").transformer.items()}
    prompts = ["a red circle", "photo of a dog"]
    with torch.no_grad():
        pe, _, pp, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                          max_sequence_length=cfg.teacher.max_sequence_length)
        # NOTE: at batch 1: the conditioner encodes "" once (its docstring: a batch of B copies may round
        # differently in the last bit)
        _, npe, _, npp = pipe.encode_prompt(prompts[:1], None, None, do_classifier_free_guidance=True,
                                            max_sequence_length=cfg.teacher.max_sequence_length)
    cond, empty = teacher.conditioner.encode(prompts), teacher.conditioner.empty(1)
    assert torch.equal(cond["encoder_hidden_states"], pe) and torch.equal(cond["pooled_projections"], pp)
    assert torch.equal(empty["encoder_hidden_states"], npe) and torch.equal(empty["pooled_projections"], npp)
    assert pe.shape == (2, 77 + 77, 96) and torch.all(pe[:, :77, 32 + 48:] == 0)
    # one sampling step end to end through diffusers' scheduler and the 16-channel VAE at 256 px
    images = pipe(prompts[:1], num_inference_steps=1, height=256, width=256, output_type="pt",
                  max_sequence_length=77, generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 256, 256) and torch.isfinite(images).all()


def test_gpu_check_export_estimate_is_the_real_export_of_an_sd3_teacher(sd3_tiny_dir, tmp_path):
    """The disk step's export term (fp32 transformer + its pos_embed buffer + a copy of the encoders,
    tokenizers, VAE and scheduler) against an export written by the trainer's own exporter. (The
    checkpoint term, buffers included, is checked against the real checkpoint by the check's resume
    step: 1.01 x on sd3_tiny in the CPU smoke run.)"""
    from sidscale.export import export_generator
    from sidscale.families.presets import build_preset_net
    from tools.gpu_check import SMOKE_MODE, Check, dir_bytes, with_train_preset

    path, info = sd3_tiny_dir
    check = Check(with_train_preset(SMOKE_MODE, "sd3_tiny"), tmp_path / "r.json", tmp_path / "w", 1, [], 0.25, None)
    check.teacher_dir = path
    net = build_preset_net("sd3_tiny", "cpu")
    ema = {k: v.float() for k, v in net.named_parameters()}  # the EMA: fp32 parameters only
    export = export_generator(ema, dict(net.config), tmp_path / "export",
                              {"teacher_kind": info["kind"], "teacher_path": str(path)})
    assert check.export_bytes() == pytest.approx(dir_bytes(export), rel=0.01)
    assert check.mode.train_preset == "sd3_tiny" and check.net_sizes() == (info["parameters"]["transformer"],
                                                                           32 * 32 * 64)


@pytest.mark.slow
def test_memory_plan_measures_sd3_tiny_within_15_percent(one_thread):
    """tools/memory_plan.py --measure --preset sd3_tiny on one in-process rank. Small reduction buckets
    (the ds_configs' 200M elements would be 94% of the total) put the peak where it is at 1024 px: the
    generator step's forward, with G's, the fake net's and the teacher's activations alive at once."""
    from tools.memory_plan import main as memory_plan_main

    out = io.StringIO()
    with single_rank_environment(), contextlib.redirect_stdout(out):
        assert memory_plan_main(["--measure", "--device", "cpu", "--preset", "sd3_tiny", "--zero", "2",
                                 "--precision", "bf16", "--micro-batch", "2", "--reduce-bucket-size", "2e5",
                                 "--steps", "1", "--json"]) == 0
    rec = _json_line(out.getvalue())
    assert rec["inputs"]["preset"] == "sd3_tiny" and rec["inputs"]["gpus"] == 1
    assert rec["peak_phase"] == "gen_forward" and rec["measured"]["device"] == "cpu"
    assert 0.85 <= rec["predicted_over_measured"] <= 1.15, rec
