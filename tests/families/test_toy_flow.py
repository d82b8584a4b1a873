"""The flow-matching toy teacher (teacher.kind toy_flow): the closed-form velocity against the VP
posterior, the spec hash, config and loading rules, the fitted teacher against the closed form, and a
one-rank K = 2 training run through the trainer (toy evaluation, export, sampling). The flow sampler
itself: tests/unit/test_flow_sampler.py."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

from sidscale.config import ConfigError, TeacherConfig, load_config, validate
from sidscale.core.schedule import FlowSchedule, VPSchedule
from sidscale.families.toy.adapter import UNetVelocity
from sidscale.families.toy.fit import ToyTeacherSpec
from sidscale.families.toy.mixture import ToyMixture

FLOW = FlowSchedule()
MIX = ToyMixture(size=8)


# ------------------------------------------------------------------------------- closed form
def test_exact_velocity_equals_the_vp_posterior_at_the_matching_state():
    """A VP state ``a x0 + s eps`` is ``(a + s) x_FM`` with ``sigma = s / (a + s)`` (docs/flow_matching.md 1.1):
    the same posterior, so the flow velocity must equal the VP formulas' ``E[eps] - E[x0]`` (those are
    tested against brute-force Bayes in test_toy.py). Plus the ends: -x at sigma 0, x - E[mu | prompt] at 1."""
    vp = VPSchedule.from_settings()
    prompts = [MIX.prompts[i] for i in (0, 5, 11, 17, 23)] + [""]
    g = torch.Generator().manual_seed(0)
    x0 = MIX.sample(prompts, g).double()
    t = torch.tensor([1, 100, 400, 625, 900, 999])
    x_vp = vp.add_noise(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), t)
    a, s = vp.coefficients(t, x_vp)
    a, s = a.double(), s.double()
    want = MIX.eps_exact(x_vp, t, prompts, vp) - MIX.x0_posterior_mean(x_vp, t, prompts, vp)
    got = MIX.velocity_exact(x_vp / (a + s), (s / (a + s)).flatten(), prompts)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)

    x = torch.randn((2, *MIX.shape), generator=g, dtype=torch.float64)
    torch.testing.assert_close(MIX.velocity_exact(x, 0.0, prompts[:2]), -x)
    mean0 = MIX.means[0].mean(0)  # prompt 0's components, equally likely: the posterior at sigma 1 is the prior
    torch.testing.assert_close(MIX.velocity_exact(x[:1], 1.0, prompts[:1]), x[:1] - mean0)


# ------------------------------------------------------------------------------- spec, config, loading
def test_spec_hash_keeps_the_eps_teacher_and_separates_the_flow_one():
    # the digest of the default (eps) spec before the parameterisation field existed: the cached
    # ~/.cache/sidscale/toy-teacher-ea0a647ad46f8191 stays valid
    assert ToyTeacherSpec().digest() == "ea0a647ad46f8191"
    assert ToyTeacherSpec().cache_name == "toy-teacher-ea0a647ad46f8191"
    flow = ToyTeacherSpec(parameterisation="flow")
    assert flow.digest() != ToyTeacherSpec().digest() and flow.cache_name.startswith("toy-flow-teacher-")
    with pytest.raises(ValueError, match="parameterisation = 'v'"):
        ToyTeacherSpec(parameterisation="v")


def test_toy_flow_config_resolution_and_a_vp_dir_is_refused(tmp_path, monkeypatch, tiny_toy_teacher):
    from sidscale.errors import TeacherDirError
    from sidscale.families import family_for_kind
    from sidscale.families.toy import fit as toy_teacher
    from sidscale.families.toy.fit import resolve_teacher_dir

    cfg = load_config("toy", ["teacher.kind=toy_flow", "teacher.resolution=12"])
    validate(cfg)  # built-in: no path needed, pixel space: no multiple of 8
    assert cfg.teacher.is_toy and not TeacherConfig(kind="sd").is_toy
    with pytest.raises(ConfigError, match="teacher.path"):
        validate(load_config("toy", ["teacher.kind=sd3"]))  # only the toy kinds are built in
    # teacher.path "" fits (or finds) the flow spec's teacher in teacher.cache_dir
    seen = []
    monkeypatch.setattr(toy_teacher, "ensure_toy_teacher", lambda cache, spec: seen.append((cache, spec)) or cache)
    resolve_teacher_dir(TeacherConfig(kind="toy_flow", cache_dir=str(tmp_path)))
    resolve_teacher_dir(TeacherConfig(kind="toy", cache_dir=str(tmp_path)))
    assert [s.parameterisation for _, s in seen] == ["flow", "eps"] and seen[0][0] == tmp_path
    # a VP toy teacher read as a velocity model would train on nonsense: refused, naming the scheduler
    cfg = types.SimpleNamespace(teacher=TeacherConfig(kind="toy_flow", path=str(tiny_toy_teacher), dtype="fp32",
                                                      resolution=8))
    with pytest.raises(TeacherDirError, match="DDPMScheduler, not a FlowMatchEulerDiscreteScheduler"):
        family_for_kind("toy_flow").load_teacher(cfg, "cpu")


# ------------------------------------------------------------------------------- the fitted teacher
def load_flow_teacher(path):
    from sidscale.families import family_for_kind

    cfg = types.SimpleNamespace(teacher=TeacherConfig(kind="toy_flow", path=str(path), dtype="fp32", resolution=8))
    return family_for_kind("toy_flow").load_teacher(cfg, "cpu")


def test_fitted_flow_teacher_predicts_the_exact_velocity(tiny_toy_flow_teacher):
    """Relative squared error ``sum |v - v_exact|^2 / sum |v_exact|^2`` of the fitted UNet's velocity (read
    at timestep 1000 sigma through the family's prediction function) against the closed form, sigma ~ U(0, 1),
    8x8, 80 fit steps. Measured: 0.140 (0.107 for sigma > 0.5, 0.185 below); the random-init UNet 1.001.
    A short fit, not a perfect one (the exact velocity of the prompt-agnostic marginal is 0.047 away from
    the conditional one), so the bound is 0.25, far below anything unfitted."""
    from sidscale.families.unet_vp.tiny import build_tiny_unet

    teacher = load_flow_teacher(tiny_toy_flow_teacher)
    assert teacher.schedule == FLOW and teacher.latent_shape == (3, 8, 8) and teacher.vae is None
    n, g = 256, torch.Generator().manual_seed(0)
    prompts = [MIX.prompts[i % len(MIX.prompts)] for i in range(n)]
    x0 = MIX.sample(prompts, g)
    sigma = torch.rand(n, generator=g)
    x_t = FLOW.add_noise(x0, torch.randn(x0.shape, generator=g), sigma)
    exact = MIX.velocity_exact(x_t, sigma, prompts)
    cond = teacher.conditioner.encode(prompts)

    def rel_error(fn) -> float:
        with torch.no_grad():
            v = fn(x_t, sigma, cond)
        return float((v - exact).square().sum() / exact.square().sum())

    fitted = rel_error(teacher.family.prediction_fn(teacher.net, teacher.schedule))
    random = rel_error(teacher.family.prediction_fn(build_tiny_unet(0, sample_size=8).eval(), teacher.schedule))
    wrong_time = rel_error(UNetVelocity(teacher.net, teacher.schedule, time_scale=1.0))
    print(f"relative velocity error: fitted {fitted:.4f}, random init {random:.4f}, timestep sigma {wrong_time:.4f}")
    assert fitted < 0.25 and random > 0.9, (fitted, random)
    # NOTE: a small net infers much of the noise level from x_t itself, so reading timestep = sigma
    # instead of 1000 sigma costs only 0.184 vs 0.140 here (0.37 vs 0.033 for the built-in 16x16 teacher);
    # test_unet_velocity_call pins the call itself.
    assert fitted < 0.9 * wrong_time, (fitted, wrong_time)


def test_unet_velocity_call():
    """The family's prediction function calls the UNet as the fit did: ``timestep = 1000 sigma`` in fp32
    (not rounded to the net's bf16), inputs in the net's dtype, the output back in fp32, unchanged."""
    seen = {}

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros((), dtype=torch.bfloat16))

        def forward(self, x, timestep, encoder_hidden_states, return_dict):
            seen.update(x=x, timestep=timestep, ehs=encoder_hidden_states)
            return (x * 2,)

    x, sigma = torch.randn(2, 3, 4, 4), torch.tensor([0.123457, 0.9])
    out = UNetVelocity(Recorder(), FLOW)(x, sigma, {"encoder_hidden_states": torch.randn(2, 5, 8)})
    assert seen["timestep"].dtype == torch.float32 and torch.equal(seen["timestep"], sigma * 1000.0)
    assert seen["x"].dtype == seen["ehs"].dtype == torch.bfloat16
    assert out.dtype == torch.float32 and torch.equal(out, x.bfloat16().float() * 2)


# ------------------------------------------------------------------------------- training
STEPS = 20
SAMPLES = 600
# CFG 1 everywhere: the student then targets the teacher's own distribution (CFG 1.5 moves the target
# away from the exact samples the Frechet distance compares with), and every call is one branch.
TRAIN = ["method.generator_steps=2", "method.gen_weighting=one_minus_sigma", "method.cfg_train_fake=1.0",
         "method.cfg_eval_fake=1.0", "method.cfg_eval_real=1.0", "generator.lr=1e-4", "fake.lr=1e-4",
         "train.global_batch=16", "train.micro_batch=16", "train.ema_halflife_kimg=0.05"]
THRESHOLD = 1.0  # measured 0.93


@pytest.mark.slow
def test_toy_flow_trains_in_the_trainer_and_exports(tmp_path, tiny_toy_flow_teacher):
    """One in-process rank, teacher.kind toy_flow, a K = 2 generator with SiD-DiT's (1 - sigma) weighting,
    20 iterations: the end-of-run toy evaluation (the 2-step student and the teacher's flow Euler sampler)
    is written, and the 2-step student's Frechet distance falls below where it starts (the teacher net as a
    2-step generator: already close to this small teacher's own samples, so 20 iterations improve it a
    little). Measured on this project's CPU: 0.664 -> 0.619 (0.93x; the teacher's 4-step Euler sampler
    0.412, the floor 0.024); the same run in the reference loop with the generator loss negated: 74.5
    (112x). The export samples like a hand-written 2-step flow generator."""
    from diffusers import UNet2DConditionModel

    from sidscale.families.toy.evaluation import toy_quality
    from sidscale.families.toy.fit import load_toy_mixture
    from sidscale.method.sid_lsg import MethodSettings
    from sidscale.sample import FewStepPipeline, seeded_generator_noises
    from tests.helpers.inprocess import run_main

    run = tmp_path / "run"
    proc = run_main(run, TRAIN + [
        "teacher.kind=toy_flow", f"teacher.path={tiny_toy_flow_teacher}", "teacher.dtype=fp32",
        "teacher.resolution=8", f"teacher.cache_dir={tmp_path / 'cache'}", "train.precision=fp32",
        f"train.max_steps={STEPS}", "train.ckpt_every=1000", "train.preview_every=1000", "train.log_every=5",
        "data.num_workers=1", f"eval.num_samples={SAMPLES}", "eval.teacher_steps=4",
    ])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run / "toy_eval.json").read_text())
    teacher = load_flow_teacher(tiny_toy_flow_teacher)
    settings = MethodSettings(generator_steps=2, gen_weighting="one_minus_sigma")
    start = toy_quality(teacher, load_toy_mixture(tiny_toy_flow_teacher), teacher.net, SAMPLES, 0, 1.0, 625,
                        settings=settings)["frechet_one_step"]
    print(f"toy_flow K=2: start {start:.4f}, after {STEPS} steps {result['frechet_one_step']:.4f}; teacher "
          f"4-step Euler {result['frechet_teacher_ddim']:.4f}, floor {result['frechet_exact_vs_exact']:.4f}")
    assert result["generator_steps"] == 2 and np.isfinite(result["frechet_teacher_ddim"])
    assert result["frechet_one_step"] < THRESHOLD * start, (start, result)

    # the export: sigma 1 then 0.5, fresh noise, timestep 1000 sigma, x0 = x - sigma v (docs/flow_matching.md 1.2)
    pipe = FewStepPipeline.from_export(run / "export")
    prompts, seeds = ["a red circle", "a blue square"], [5, 6]
    z1, z2 = seeded_generator_noises(seeds, (3, 8, 8), 2)
    unet = UNet2DConditionModel.from_pretrained(run / "export" / "unet").eval()
    ehs = pipe.conditioner.encode(prompts)["encoder_hidden_states"]
    with torch.no_grad():
        x0 = z1 - unet(z1, torch.full((2,), 1000.0), encoder_hidden_states=ehs).sample
        x = 0.5 * x0 + 0.5 * z2
        x0 = x - 0.5 * unet(x, torch.full((2,), 500.0), encoder_hidden_states=ehs).sample
    torch.testing.assert_close(pipe.latents(prompts, seeds), x0, rtol=1e-4, atol=1e-4)
