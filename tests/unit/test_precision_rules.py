"""Numerics of the precision modes and the NaN guard of the fake step (issue 12, faults 6, 7, 11)."""

from __future__ import annotations

import copy

import pytest
import torch

from sidscale.core.schedule import VPSchedule
from sidscale.method import MethodSettings, StepNoise, fake_step

B, C, H, W = 4, 2, 2, 2
D = C * H * W


class TinyEps(torch.nn.Module):
    """A small nonlinear eps-net (x, t, cond) -> eps: hidden = tanh(A x + U c), out = V hidden."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = torch.nn.Parameter(0.3 * torch.randn(16, D, generator=g, dtype=torch.float64))
        self.U = torch.nn.Parameter(0.3 * torch.randn(16, D, generator=g, dtype=torch.float64))
        self.out = torch.nn.Linear(16, D, dtype=torch.float64)

    def forward(self, x, t, cond):
        c = cond["encoder_hidden_states"].mean(1)
        hidden = torch.tanh(x.flatten(1) @ self.A.T + c @ self.U.T)
        return self.out(hidden).view(x.shape)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    noise = StepNoise(z=torch.randn(B, C, H, W, generator=g, dtype=torch.float64),
                      eps=torch.randn(B, C, H, W, generator=g, dtype=torch.float64),
                      t=torch.tensor([20, 300, 625, 979]), drop=torch.zeros(B, dtype=torch.bool))
    cond = {"encoder_hidden_states": torch.randn(B, 3, D, generator=g, dtype=torch.float64)}
    uncond = {"encoder_hidden_states": torch.randn(1, 3, D, generator=g, dtype=torch.float64).expand(B, -1, -1)}
    return noise, cond, uncond


def _grads(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("cfg_scale", [1.0, 1.5])
def test_fake_step_nan_sample_leaves_other_gradients_exact(cfg_scale):
    """A NaN written into sample k of the fake net's output (a forward hook on its last layer,
    inside the network) must drop sample k only: the gradients equal a run on the batch without
    k, with the same normaliser (the per-rank batch B)."""
    s = VPSchedule.from_settings()
    schedule = VPSchedule(s.alphas_cumprod.double(), "epsilon")
    settings = MethodSettings(cfg_train_fake=cfg_scale, prompt_dropout=0.0)
    gen, fake = TinyEps(1).requires_grad_(False), TinyEps(2)
    fake_ref = copy.deepcopy(fake)
    noise, cond, uncond = _inputs(3)
    bad = 1

    def hook(_module, _inputs, out):
        # ADD a NaN (an in-place write would itself zero the gradient of that row and hide a leak)
        mask = torch.zeros_like(out)
        mask[bad] = float("nan")
        return out + mask

    handle = fake.out.register_forward_hook(hook)
    loss, stats = fake_step(gen, fake, schedule, noise, cond, uncond, settings, loss_normaliser=B)
    handle.remove()
    loss.backward()
    assert stats["dropped_fake"].item() == 1 and torch.isfinite(loss)

    keep = [i for i in range(B) if i != bad]
    sub = StepNoise(*(getattr(noise, f)[keep] for f in ("z", "eps", "t", "drop")))
    ref_loss, _ = fake_step(gen, fake_ref, schedule, sub, {k: v[keep] for k, v in cond.items()},
                            {k: v[keep] for k, v in uncond.items()}, settings, loss_normaliser=B)
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    got, want = _grads(fake), _grads(fake_ref)
    for name in want:
        assert torch.isfinite(got[name]).all(), f"{name}: the NaN sample leaked into the gradient"
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-14, msg=name)


# --------------------------------------------------------------------------------------------
# Fault 6: TF32 per precision, applied by the Trainer
# --------------------------------------------------------------------------------------------


@pytest.fixture
def restore_math_flags():
    from sidscale.core.precision import current_settings, restore_settings

    saved = current_settings()
    yield
    restore_settings(saved)


class _StopAfterPrecisionSetup(Exception):
    pass


class _TeacherStub:
    """Stands in for a teacher; the Trainer reads ``.schedule`` right after its start-up settings,
    so the test stops there without building engines."""

    @property
    def schedule(self):
        raise _StopAfterPrecisionSetup


def _trainer_start(precision: str, tmp_path) -> None:
    from sidscale.config import load_config
    from sidscale.distributed.runtime import DistInfo
    from sidscale.trainer import Trainer

    cfg = load_config("toy", [f"train.precision={precision}"])
    with pytest.raises(_StopAfterPrecisionSetup):
        Trainer(cfg, tmp_path, DistInfo(0, 1, 0, torch.device("cpu")), teacher=_TeacherStub())


def test_trainer_fp32_turns_tf32_off(restore_math_flags, tmp_path):
    torch.set_float32_matmul_precision("high")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    _trainer_start("fp32", tmp_path)
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 is False  # torch's default is True: UNet convolutions in TF32
    assert torch.get_float32_matmul_precision() == "highest"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_trainer_low_precision_allows_tf32(restore_math_flags, tmp_path, precision):
    """bf16/fp16 allow TF32 (10 mantissa bits, more than bf16's 7) on CUDA only: the CPU's fp32
    matmul precision (oneDNN, set by set_float32_matmul_precision) is left as it was."""
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    _trainer_start(precision, tmp_path)
    assert torch.backends.cuda.matmul.allow_tf32 is True
    assert torch.backends.cudnn.allow_tf32 is True
    assert torch.backends.mkldnn.matmul.fp32_precision in ("ieee", "none")


# --------------------------------------------------------------------------------------------
# Fault 7: the method's fp16 rules (Adam eps 1e-6, gradient values clipped to [-1, 1])
# --------------------------------------------------------------------------------------------


def test_fp16_defaults_and_overrides():
    from sidscale.config import NetConfig, load_config
    from sidscale.core.precision import adam_eps, grad_clip_value

    assert (adam_eps(NetConfig(), "fp16"), grad_clip_value(NetConfig(), "fp16")) == (1e-6, 1.0)
    for precision in ("fp32", "bf16"):
        assert (adam_eps(NetConfig(), precision), grad_clip_value(NetConfig(), precision)) == (1e-8, None)
    assert adam_eps(NetConfig(eps=1e-8), "fp16") == 1e-8  # overridable
    assert grad_clip_value(NetConfig(grad_clip_value=0.0), "fp16") is None  # 0 = off
    assert grad_clip_value(NetConfig(grad_clip_value=0.5), "bf16") == 0.5
    # every preset leaves both to the precision rule, and --set reaches them
    for preset in ("toy", "sd15", "sdxl"):
        cfg = load_config(preset, ["teacher.path=/x"] if preset != "toy" else [])
        assert (cfg.generator.eps, cfg.fake.grad_clip_value) == (None, None), preset
    cfg = load_config("toy", ["generator.eps=1e-7", "fake.grad_clip_value=2", "generator.grad_clip_value=null"])
    assert (cfg.generator.eps, cfg.fake.grad_clip_value, cfg.generator.grad_clip_value) == (1e-7, 2.0, None)


@pytest.fixture(scope="module")
def one_rank():
    from tests.helpers.inprocess import one_rank_group

    with one_rank_group() as info:
        yield info


def _fp16_engine(tmp_path, stage: int, monkeypatch, **net):
    """A DeepSpeed fp16 engine (static loss scale 1024, 2 micro-batches per step) on a tiny Linear,
    built by the trainer's build_engine."""
    import json

    from deepspeed.accelerator import get_accelerator

    from sidscale.config import NetConfig, load_config
    from sidscale.distributed.ds_config import build_ds_config
    from sidscale.distributed.engines import build_engine

    # NOTE: DeepSpeed refuses fp16 where oneDNN has no fp16 kernels (this CPU); torch's own CPU fp16
    # kernels run a tiny Linear fine, so only the capability check is patched.
    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: True)
    ds_path = tmp_path / f"zero{stage}.json"
    ds_path.write_text(json.dumps({"zero_optimization": {"stage": stage}, "fp16": {"loss_scale": 1024}}))
    cfg = load_config("toy", ["train.precision=fp16", "train.micro_batch=2", "train.global_batch=4",
                              f"deepspeed.config={ds_path}"])
    torch.manual_seed(0)
    module = torch.nn.Linear(6, 4, bias=False)
    with torch.no_grad():
        module.weight.copy_(torch.randn(4, 6) * 0.5)
    engine = build_engine(module, NetConfig(lr=1e-2, betas=(0.0, 0.999), **net), build_ds_config(cfg, 1))
    return engine, module.weight.detach().half().double()  # DeepSpeed's masters start from the fp16 weights


def _masters(engine) -> torch.Tensor:
    opt = engine.optimizer
    flat = (opt.single_partition_of_fp32_groups[0] if hasattr(opt, "single_partition_of_fp32_groups")
            else opt.fp32_partitioned_groups_flat[0])
    return flat.detach().double()[:24].view(4, 6)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_fp16_clips_unscaled_accumulated_gradient_before_adam(one_rank, tmp_path, monkeypatch, stage):
    """Plain-PyTorch expectation: accumulate the micro-batch gradients (mean over the 2 rounds),
    unscale, clamp to [-1, 1], one torch Adam step. Clipping the scaled gradient at 1, or each
    micro-batch's gradient, gives visibly different weights (checked below, so the test has power)."""
    engine, w0 = _fp16_engine(tmp_path, stage, monkeypatch, eps=1.0)
    assert engine.optimizer.optimizer.param_groups[0]["eps"] == 1.0
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 6, generator=g) * 3 for _ in range(2)]
    targets = [torch.randn(2, 4, generator=g) * 3 for _ in range(2)]
    for x, y in zip(xs, targets, strict=True):
        out = engine(x.half())
        engine.backward((out.float() - y).square().sum())
        engine.step()
    assert engine.was_step_applied()

    def grad(x, y, w):
        w = w.clone().requires_grad_(True)
        (((x.half().double() @ w.T) - y.double()).square().sum()).backward()
        return w.grad

    per_round = [grad(x, y, w0) for x, y in zip(xs, targets, strict=True)]
    accumulated = (per_round[0] + per_round[1]) / 2  # DeepSpeed divides each round's loss by the rounds

    def adam_step(grad_value):
        w = torch.nn.Parameter(w0.clone())
        opt = torch.optim.Adam([w], lr=1e-2, betas=(0.0, 0.999), eps=1.0)
        w.grad = grad_value
        opt.step()
        return w.detach()

    expected = adam_step(accumulated.clamp(-1, 1))
    assert (accumulated.abs() > 1).any() and (accumulated.abs() < 1).any()  # both branches of the clip
    got = _masters(engine)
    # fp16 gradients carry ~5e-4 relative error, i.e. up to ~0.03 on the unclipped entries (|g| < 1
    # after rounds of |g| ~ 40 cancel): at lr 1e-2 that is < 5e-4 in the weights.
    torch.testing.assert_close(got, expected, rtol=0, atol=5e-4)
    wrong = {"no clip": adam_step(accumulated), "per-round clip": adam_step(
        (per_round[0].clamp(-1, 1) + per_round[1].clamp(-1, 1)) / 2),
        "clip of the scaled gradient": adam_step((accumulated * 1024).clamp(-1, 1) / 1024)}
    for name, w in wrong.items():
        assert (w - expected).abs().max() > 2e-3, name


def test_fp16_engine_uses_recipe_eps_by_default(one_rank, tmp_path, monkeypatch):
    engine, _ = _fp16_engine(tmp_path, 2, monkeypatch)
    assert engine.optimizer.optimizer.param_groups[0]["eps"] == 1e-6


# --------------------------------------------------------------------------------------------
# pure_bf16 (the authors' --bf16 1): rules, the ds_config it writes, what it refuses
# --------------------------------------------------------------------------------------------


def test_trainer_pure_bf16_turns_tf32_off(restore_math_flags, tmp_path):
    """pure_bf16 runs with TF32 off like the authors' loop (the fp32 losses and reductions stay exact)."""
    torch.set_float32_matmul_precision("high")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    _trainer_start("pure_bf16", tmp_path)
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 is False
    assert torch.get_float32_matmul_precision() == "highest"


def test_pure_bf16_defaults_and_overrides():
    from sidscale.config import NetConfig
    from sidscale.core.precision import adam_eps, grad_clip_value

    assert (adam_eps(NetConfig(), "pure_bf16"), grad_clip_value(NetConfig(), "pure_bf16")) == (1e-4, 1.0)
    assert adam_eps(NetConfig(eps=1e-8), "pure_bf16") == 1e-8  # an explicit value wins
    assert grad_clip_value(NetConfig(grad_clip_value=0.0), "pure_bf16") is None  # 0 = off
    assert grad_clip_value(NetConfig(grad_clip_value=0.25), "pure_bf16") == 0.25


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_pure_bf16_ds_config(stage):
    """The effective ds_config: DeepSpeed's bf16 block with bf16 master weights, gradients and optimizer
    states, bf16 gradient accumulation (no fp32 communication override), and the engines read it back as
    pure_bf16 (so they get its eps and clip); bf16 keeps its fp32 masters and fp32 accumulation."""
    from sidscale.config import load_config
    from sidscale.distributed.ds_config import build_ds_config
    from sidscale.distributed.engines import ds_precision

    cfg = load_config("toy", ["train.precision=pure_bf16", f"deepspeed.config=ds_configs/zero{stage}.json"])
    ds = build_ds_config(cfg, 1)
    assert ds["bf16"] == {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}
    assert ds["fp16"] == {"enabled": False}
    assert ds["data_types"]["grad_accum_dtype"] == "bf16" and "communication_data_type" not in ds
    assert ds_precision(ds) == "pure_bf16"
    bf = build_ds_config(load_config("toy", ["train.precision=bf16", f"deepspeed.config=ds_configs/zero{stage}.json"]),
                         1)
    assert bf["bf16"] == {"enabled": True} and bf["data_types"]["grad_accum_dtype"] == "fp32"
    assert ds_precision(bf) == "bf16"


@pytest.mark.parametrize("setup, message", [
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}, "offload_optimizer"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, "offload_param"),
    ({"zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"}}, "grad_accum_dtype"),
])
def test_pure_bf16_refuses_what_deepspeed_cannot_run(tmp_path, setup, message):
    """Offload (DeepSpeed 0.19.8 asserts on a torch Adam with bf16 masters) and fp32 accumulation (ZeRO-1
    would silently become BF16_Optimizer with fp32 masters) are refused, naming train.precision; the same
    ds_configs under bf16 are accepted."""
    import json

    from sidscale.config import ConfigError, load_config
    from sidscale.distributed.ds_config import build_ds_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(setup))
    with pytest.raises(ConfigError, match=rf"{message}.*train.precision = 'pure_bf16'"):
        build_ds_config(load_config("toy", ["train.precision=pure_bf16", f"deepspeed.config={path}"]), 1)
    build_ds_config(load_config("toy", ["train.precision=bf16", f"deepspeed.config={path}"]), 1)


def test_pure_bf16_is_a_train_precision_only():
    from sidscale.config import ConfigError, load_config, validate

    validate(load_config("toy", ["train.precision=pure_bf16"]))
    with pytest.raises(ConfigError, match="teacher.dtype"):
        validate(load_config("toy", ["teacher.dtype=pure_bf16"]))
