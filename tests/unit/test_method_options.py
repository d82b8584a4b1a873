"""Issue 25's method options against independent computations: the generator-loss weightings (closed
forms in flow sigma and in a VP teacher's a, s; the authors' spellings; the 1e-5 clip), the K-step
generator's noise types (a hand-unrolled K = 3 loop on a tiny conv net, gradient through the last
step only; the export's sampling meta and the sampler), Zero-CFG (a text-free fake net) and Anti-CFG
(negative fake-net scales), and the config rules of those keys."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sidscale.config import load_config
from sidscale.core.schedule import FlowSchedule, VPSchedule
from sidscale.errors import ConfigError
from sidscale.method import (
    MethodSettings,
    StepNoise,
    fake_step,
    generate,
    generator_step,
    guided_eps,
    multi_step_generate,
)
from sidscale.method.losses import GEN_WEIGHTINGS, generator_weight, sid_generator_loss

C, H, W = 2, 3, 3
B = 4
K = 3


# ------------------------------------------------------------------------------------------- nets
class TinyConv(torch.nn.Module):
    """pred(x, level, c) = conv(x) + level * b + mean_tokens(c) projected: deterministic, float64, depends on
    all three inputs. Counts calls and records the conditionings it sees (a spy)."""

    def __init__(self, seed: int, scale: float = 0.3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(C, C, 3, padding=1, dtype=torch.float64)
        with torch.no_grad():
            self.conv.weight.copy_(scale * torch.randn(self.conv.weight.shape, generator=g, dtype=torch.float64))
            self.conv.bias.copy_(scale * torch.randn(C, generator=g, dtype=torch.float64))
        self.b = torch.nn.Parameter(scale * torch.randn(C, 1, 1, generator=g, dtype=torch.float64))
        self.U = torch.nn.Parameter(scale * torch.randn(C, 5, generator=g, dtype=torch.float64))
        self.seen: list[torch.Tensor] = []

    def forward(self, x, level, cond):
        c = cond["encoder_hidden_states"]
        self.seen.append(c.detach().clone())
        dt = self.U.dtype
        lv = level.to(dt).view(-1, 1, 1, 1)
        lv = lv / 1000 if level.dtype == torch.long else lv
        return self.conv(x.to(dt)) + lv * self.b + (c.to(dt).mean(1) @ self.U.T).view(-1, C, 1, 1)


def conds(seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = {"encoder_hidden_states": torch.randn(B, 3, 5, generator=g, dtype=torch.float64)}
    uncond = {"encoder_hidden_states": torch.randn(1, 3, 5, generator=g, dtype=torch.float64).expand(B, -1, -1)}
    return cond, uncond


def vp64() -> VPSchedule:
    s = VPSchedule.from_settings()
    return VPSchedule(s.alphas_cumprod.double(), "epsilon")


def step_noise(seed=1, t=None, k_extra=K - 1) -> StepNoise:
    g = torch.Generator().manual_seed(seed)
    return StepNoise(z=torch.randn(B, C, H, W, generator=g, dtype=torch.float64),
                     eps=torch.randn(B, C, H, W, generator=g, dtype=torch.float64),
                     t=torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=torch.float64) if t is None else t,
                     drop=torch.zeros(B, dtype=torch.bool),
                     z_more=torch.randn(B, k_extra, C, H, W, generator=g, dtype=torch.float64))


# ------------------------------------------------------------------------------------------- weightings
LO = 1e-5


def closed_form_flow(name: str, sigma: float) -> float:
    """lambda(sigma), written as min(1/u, 1e5), the same as 1/max(u, 1e-5) (the spec's table)."""
    u = sigma / (1 - sigma)
    return {"one_minus_sigma": 1 - sigma, "one_minus_sigma_squared": (1 - sigma) ** 2,
            "one_over_sigma": min(1 / sigma, 1 / LO), "one_over_sigma_squared": min(1 / sigma ** 2, 1 / LO),
            "snr_sqrt": min(1 / u, 1 / LO), "snr": min((1 - sigma) ** 2 / sigma ** 2, 1 / LO)}[name]


SIGMAS = [1e-7, 2e-3, 0.05, 0.5, 0.93]  # the first two hit the clip for the 1/sigma- and 1/sigma^2-forms


@pytest.mark.parametrize("name", [n for n in GEN_WEIGHTINGS if n != "sid_legacy"])
def test_flow_weightings_match_their_closed_forms_including_the_clip(name):
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)
    x = torch.zeros(len(SIGMAS), 1)
    got = generator_weight(name, sigma, x, x)
    want = torch.tensor([closed_form_flow(name, s) for s in SIGMAS], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert not got.requires_grad


def test_the_clip_caps_lambda_at_1e5():
    sigma = torch.tensor([1e-9], dtype=torch.float64)
    x = torch.zeros(1, 1)
    for name in ("one_over_sigma", "one_over_sigma_squared", "snr_sqrt", "snr"):
        assert generator_weight(name, sigma, x, x).item() == pytest.approx(1e5, rel=1e-12)
    # sigma = 1e-3: 1/sigma = 1e3 is below the cap, 1/sigma^2 = 1e6 is above it
    s = torch.tensor([1e-3], dtype=torch.float64)
    assert generator_weight("one_over_sigma", s, x, x).item() == pytest.approx(1e3)
    assert generator_weight("one_over_sigma_squared", s, x, x).item() == pytest.approx(1e5)


@pytest.mark.parametrize("name", [n for n in GEN_WEIGHTINGS if n != "sid_legacy"])
def test_vp_weightings_use_the_flow_equivalent_sigma(name):
    """For a VP teacher, lambda in a = sqrt(abar), s = sqrt(1 - abar) (spec table, VP column)."""
    sched = vp64()
    t = torch.tensor([20, 300, 625, 979])
    abar = VPSchedule.from_settings().alphas_cumprod.double()[t]  # the same betas, read independently
    a, s = abar.sqrt(), (1 - abar).sqrt()
    want = {"one_minus_sigma": a / (a + s), "one_minus_sigma_squared": a ** 2 / (a + s) ** 2,
            "one_over_sigma": (a + s) / s, "one_over_sigma_squared": (a + s) ** 2 / s ** 2,
            "snr_sqrt": a / s, "snr": a ** 2 / s ** 2}[name]
    x = torch.zeros(B, C, H, W, dtype=torch.float64)
    sigma = sched.flow_sigma(t, x).reshape(-1)
    torch.testing.assert_close(generator_weight(name, sigma, x, x), want, rtol=1e-10, atol=0)


def test_sid_legacy_multiplier_is_one_over_the_normaliser_and_clipped():
    g = torch.Generator().manual_seed(3)
    x_g, y = torch.randn(B, C, H, W, generator=g), torch.randn(B, C, H, W, generator=g)
    y[0] = x_g[0]  # |x_g - y_real| = 0: the normaliser is clipped to 1e-5
    want = 1 / torch.tensor([max(float((x_g[i] - y[i]).abs().mean()), LO) for i in range(B)])
    got = generator_weight("sid_legacy", None, x_g, y)
    torch.testing.assert_close(got, want)
    assert got.dtype == torch.float32 and got[0].item() == pytest.approx(1e5)


ALIASES = {"1_minus_sigma": "one_minus_sigma", "1_minus_sigma_squared": "one_minus_sigma_squared",
           "1_over_sigma": "one_over_sigma", "1_over_sigma2": "one_over_sigma_squared", "snr_sqrt": "snr_sqrt",
           "snr": "snr", "sid_default": "sid_legacy"}


@pytest.mark.parametrize("alias,canonical", ALIASES.items())
def test_authors_spellings_are_stored_as_ours(alias, canonical):
    assert MethodSettings(gen_weighting=alias).gen_weighting == canonical
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)
    x = torch.randn(len(SIGMAS), 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(generator_weight(alias, sigma, x, 0.5 * x),
                               generator_weight(canonical, sigma, x, 0.5 * x))
    with pytest.raises(ValueError, match="gen_weighting 'one_over_sigma3'"):
        MethodSettings(gen_weighting="one_over_sigma3")


@pytest.mark.parametrize("name", ["one_minus_sigma_squared", "one_over_sigma", "snr"])
def test_generator_step_multiplies_the_sid_loss_by_lambda(name):
    """The whole generator step (flow, K = 1): loss = sum_b lambda_b SiD_b / B, lambda from the closed form."""
    gen, fake, teacher = TinyConv(1), TinyConv(2).requires_grad_(False), TinyConv(3).requires_grad_(False)
    noise = step_noise(k_extra=0)
    noise.z_more = None
    cond, uncond = conds()
    s = MethodSettings(cfg_eval_fake=1.0, cfg_eval_real=1.0, alpha=1.2, gen_weighting=name)
    loss, stats = generator_step(gen, fake, teacher, FlowSchedule(), noise, cond, uncond, s, loss_normaliser=B)
    sig = noise.t.view(-1, 1, 1, 1)
    x_g = gen(noise.z, torch.ones(B, dtype=torch.float64), cond) * -1 + noise.z  # x0 = x_t - 1 * v at sigma 1
    x_t = (1 - sig) * x_g + sig * noise.eps
    y_r, y_f = x_t - sig * teacher(x_t, noise.t, cond), x_t - sig * fake(x_t, noise.t, cond)
    per = ((y_r - y_f) * ((y_r - x_g) - 1.2 * (y_r - y_f))).flatten(1).sum(1)
    lam = torch.tensor([closed_form_flow(name, float(v)) for v in noise.t], dtype=torch.float64)
    torch.testing.assert_close(loss, (per * lam).sum() / B, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats["w_mean"], lam.mean(), rtol=1e-10, atol=0)


def test_existing_weightings_keep_their_returned_weight():
    g = torch.Generator().manual_seed(5)
    x_g, y_r, y_f = (torch.randn(B, C, H, W, generator=g) for _ in range(3))
    sigma = torch.rand(B, generator=g)
    _, w = sid_generator_loss(x_g, y_r, y_f, 1.0, "sid_legacy")
    torch.testing.assert_close(w, (x_g - y_r).abs().flatten(1).mean(1))  # the normaliser (the loss divides)
    _, w = sid_generator_loss(x_g, y_r, y_f, 1.0, "one_minus_sigma", sigma)
    torch.testing.assert_close(w, 1 - sigma)


# ------------------------------------------------------------------------------------------- noise types
def hand_loop(net, sched_kind, noises, cond, noise_type, k, sigma_init=1.0, t_init=625, graph_all=False):
    """K = 3 steps written out: flow sigma_i = sigma_init (1 - i/K), x_i = (1-sigma_i) x0 + sigma_i eps_i,
    x0_i = x_i - sigma_i v_i, ddim eps = x_{i-1} + (1 - sigma_{i-1}) v_{i-1}; VP t_i = int(t_init (1 - i/K)),
    x_i = a x0 + s eps_i, x0_i = (x_i - s eps_hat_i) / a, ddim eps = eps_hat_{i-1} (the prediction itself).
    Earlier steps are detached unless ``graph_all``."""
    abar = VPSchedule.from_settings().alphas_cumprod.double()
    x0, prev = None, None
    for i in range(k):
        if i == 0 or noise_type == "fixed":
            e = noises[0]
        elif noise_type == "fresh":
            e = noises[i]
        else:
            e = prev
        if sched_kind == "flow":
            sg = sigma_init * (1 - i / K)
            x = sg * e if i == 0 else (1 - sg) * x0 + sg * e
            v = net(x, torch.full((x.shape[0],), sg, dtype=torch.float64), cond)
            x0 = x - sg * v
            prev = x + (1 - sg) * v
        else:
            t = int(t_init * (1 - i / K))
            a, s = abar[t].sqrt(), (1 - abar[t]).sqrt()
            x = s * e if i == 0 else a * x0 + s * e
            eh = net(x, torch.full((x.shape[0],), t), cond)
            x0 = (x - s * eh) / a
            prev = eh
        if i < k - 1 and not graph_all:
            x0, prev = x0.detach(), prev.detach()
    return x0


def _schedule(kind):
    return FlowSchedule() if kind == "flow" else vp64()


@pytest.mark.parametrize("kind", ["flow", "vp"])
@pytest.mark.parametrize("noise_type", ["fresh", "fixed", "ddim"])
def test_noise_types_match_the_hand_unrolled_loop_and_its_gradient(kind, noise_type):
    gen = TinyConv(7)
    noise = step_noise()
    cond, _ = conds()
    noises = noise.generator_noises(K)
    # flow: sigma_init 0.75 (levels 0.75, 0.5, 0.25, exact in fp32 as the level tensors are)
    s = MethodSettings(generator_steps=K, noise_type=noise_type, sigma_init=0.75 if kind == "flow" else 1.0)
    with torch.no_grad():
        got = multi_step_generate(gen, _schedule(kind), noises, cond, s)
    want = hand_loop(gen, kind, noises, cond, noise_type, K, sigma_init=s.sigma_init)
    torch.testing.assert_close(got, want.detach(), rtol=1e-9, atol=1e-10)

    # the gradient: through the last step only (earlier steps are constants)
    out = multi_step_generate(gen, _schedule(kind), noises, cond, s)
    grads = torch.autograd.grad(out.square().sum(), list(gen.parameters()))
    ref = hand_loop(gen, kind, noises, cond, noise_type, K, sigma_init=s.sigma_init)
    want_grads = torch.autograd.grad(ref.square().sum(), list(gen.parameters()))
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
    full = hand_loop(gen, kind, noises, cond, noise_type, K, sigma_init=s.sigma_init, graph_all=True)
    full_grad = torch.autograd.grad(full.square().sum(), [gen.conv.weight])[0]
    assert (full_grad - grads[0]).abs().max() > 1e-6  # the test can tell "last step only" from "all steps"


def test_ddim_equals_fixed_at_step_1_from_sigma_1_and_differs_from_step_2_on():
    gen = TinyConv(8)
    noises = step_noise().generator_noises(K)
    cond, _ = conds()

    def run(kind, noise_type, k):
        levels = _schedule(kind).generator_levels(MethodSettings(), K)  # the K = 3 levels, first k of them
        with torch.no_grad():
            return generate(gen, _schedule(kind), noises[:k], cond, levels[:k], noise_type)

    assert torch.equal(run("flow", "ddim", 2), run("flow", "fixed", 2))  # eps_1 = x_0 = z exactly
    assert (run("flow", "ddim", 3) - run("flow", "fixed", 3)).abs().max() > 1e-4
    assert (run("vp", "ddim", 2) - run("vp", "fixed", 2)).abs().max() > 1e-4  # t_init 625: differs at once
    assert (run("flow", "fresh", 2) - run("flow", "fixed", 2)).abs().max() > 1e-4


@pytest.mark.parametrize("phase", ["fake", "gen"])
def test_both_training_phases_honour_the_noise_type(phase):
    """fixed with any z_more == fresh with z_more = (z, z): the training steps pass the type through."""
    gen, fake, teacher = TinyConv(1), TinyConv(2), TinyConv(3).requires_grad_(False)
    cond, uncond = conds()
    noise = step_noise()
    same = StepNoise(noise.z, noise.eps, noise.t, noise.drop, torch.stack([noise.z, noise.z], 1))

    def loss(settings, n):
        if phase == "fake":
            return fake_step(gen, fake, FlowSchedule(), n, cond, uncond, settings, B, k=K)[0]
        return generator_step(gen, fake.requires_grad_(False), teacher, FlowSchedule(), n, cond, uncond,
                              settings, B, k=K)[0]

    s = dict(generator_steps=K, prompt_dropout=0.0, gen_weighting="one_minus_sigma")
    fixed = loss(MethodSettings(noise_type="fixed", **s), noise)
    torch.testing.assert_close(fixed, loss(MethodSettings(noise_type="fresh", **s), same), rtol=1e-12, atol=0)
    assert (fixed - loss(MethodSettings(noise_type="fresh", **s), noise)).abs() > 1e-6


def test_the_noise_draws_do_not_depend_on_the_noise_type():
    from sidscale.method.sid import SiD

    draws = [SiD(MethodSettings(generator_steps=K, noise_type=n), None, None).draw_noise(
        0, 5, 1, torch.arange(B), (C, H, W), FlowSchedule(), torch.device("cpu")) for n in ("fresh", "fixed", "ddim")]
    for d in draws[1:]:
        for f in ("z", "eps", "t", "drop", "z_more"):
            assert torch.equal(getattr(d, f), getattr(draws[0], f))


# ------------------------------------------------------------------------------------------- export / sampler
def _run(noise_type):
    """The attributes ``outputs.sampling_meta`` reads, for a flow toy run."""
    settings = MethodSettings(generator_steps=K, noise_type=noise_type)
    teacher = SimpleNamespace(path=Path("/nonexistent/teacher"), latent_shape=(C, H, W),
                              scaling_factor=1.0, shift_factor=None)
    family = SimpleNamespace(name="unet_flow", sampling_extras=lambda cfg: {"time_scale": 1000.0})
    cfg = SimpleNamespace(teacher=SimpleNamespace(kind="toy_flow", resolution=H))
    return SimpleNamespace(settings=settings, teacher=teacher, family=family, cfg=cfg, schedule=FlowSchedule(),
                           step=3, images_seen=12)


class UNetLike(torch.nn.Module):
    """The call a toy_flow export's UNet gets (``UNetVelocity``): (x, timestep, encoder_hidden_states)."""

    def __init__(self):
        super().__init__()
        self.inner = TinyConv(11)

    def forward(self, x, timestep, encoder_hidden_states=None, return_dict=False):
        return (self.inner(x, timestep / 1000.0, {"encoder_hidden_states": encoder_hidden_states}),)


def test_export_meta_records_the_noise_type_and_the_sampler_honours_it():
    from sidscale.outputs import sampling_meta
    from sidscale.sample import FewStepPipeline, sampling_settings, seeded_generator_noises

    meta = json.loads(json.dumps(sampling_meta(_run("ddim"))))  # as sidscale.json stores it
    assert meta["noise_type"] == "ddim" and sampling_settings(meta).noise_type == "ddim"
    old = {k: v for k, v in meta.items() if k != "noise_type"}
    assert sampling_settings(old).noise_type == "fresh"  # an export written before noise types

    net = UNetLike().float()
    cond = {"encoder_hidden_states": torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(2))}
    conditioner = SimpleNamespace(encode=lambda prompts: cond)
    seeds = [4, 9]
    for noise_type in ("ddim", "fresh"):
        m = {**meta, "noise_type": noise_type}
        pipe = FewStepPipeline(net, conditioner, None, FlowSchedule(), m, "cpu", torch.float32)
        got = pipe.latents(["a", "b"], seeds)
        noises = [n.double() for n in seeded_generator_noises(seeds, (C, H, W), K)]
        with torch.no_grad():
            want = hand_loop(net.inner, "flow", noises, cond, noise_type, K)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- Zero-CFG / Anti-CFG
@pytest.mark.parametrize("phase", ["fake", "gen"])
def test_zero_cfg_fake_net_sees_only_the_empty_prompt_in_one_call(phase):
    gen, fake, teacher = TinyConv(1), TinyConv(2), TinyConv(3).requires_grad_(False)
    cond, uncond = conds()
    noise = step_noise(k_extra=0)
    noise.z_more = None
    noise.drop = torch.ones(B, dtype=torch.bool)  # would drop every prompt if dropout still applied
    s = MethodSettings(cfg_train_fake=2.0, cfg_eval_fake=3.0, cfg_eval_real=1.0, fake_text=False,
                       prompt_dropout=0.5)
    sched = FlowSchedule()
    if phase == "fake":
        loss, _ = fake_step(gen, fake, sched, noise, cond, uncond, s, B)
    else:
        loss, _ = generator_step(gen, fake.requires_grad_(False), teacher, sched, noise, cond, uncond, s, B)
    assert len(fake.seen) == 1 and torch.equal(fake.seen[0], uncond["encoder_hidden_states"])
    assert all(torch.equal(c, cond["encoder_hidden_states"]) for c in gen.seen)  # the generator keeps its text

    # the value: the fake net's unconditional prediction, no CFG
    sig = noise.t.view(-1, 1, 1, 1)
    x_g = noise.z - gen(noise.z, torch.ones(B, dtype=torch.float64), cond)
    x_t = (1 - sig) * x_g + sig * noise.eps
    v_f = fake(x_t, noise.t, uncond)
    if phase == "fake":
        want = (v_f - (noise.eps - x_g)).square().sum() / B
    else:
        y_r, y_f = x_t - sig * teacher(x_t, noise.t, cond), x_t - sig * v_f
        w = (x_g - y_r).abs().flatten(1).mean(1)
        want = (((y_r - y_f) * ((y_r - x_g) - (y_r - y_f))).flatten(1).sum(1) / w).sum() / B
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scale", [-0.7, -2.0])
def test_anti_cfg_negative_scale_extrapolates_away_from_the_prompt(scale):
    net = TinyConv(4)
    cond, uncond = conds()
    x = torch.randn(B, C, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    t = torch.full((B,), 0.5, dtype=torch.float64)
    e_u, e_c = net(x, t, uncond), net(x, t, cond)
    net.seen.clear()
    got = guided_eps(net, x, t, cond, uncond, scale)
    torch.testing.assert_close(got, e_u + scale * (e_c - e_u), rtol=1e-12, atol=1e-12)
    assert len(net.seen) == 1 and net.seen[0].shape[0] == 2 * B  # one batched call

    # through the fake step: DSM on the negatively guided fake prediction
    gen, fake = TinyConv(1), TinyConv(2)
    noise = step_noise(k_extra=0)
    noise.z_more = None
    loss, _ = fake_step(gen, fake, FlowSchedule(), noise, cond, uncond,
                        MethodSettings(cfg_train_fake=scale, prompt_dropout=0.0), B)
    sig = noise.t.view(-1, 1, 1, 1)
    x_g = noise.z - gen(noise.z, torch.ones(B, dtype=torch.float64), cond)
    x_t = (1 - sig) * x_g + sig * noise.eps
    f_u, f_c = fake(x_t, noise.t, uncond), fake(x_t, noise.t, cond)
    want = ((f_u + scale * (f_c - f_u)) - (noise.eps - x_g)).square().sum() / B
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)


def test_scale_zero_is_one_unconditional_call():
    net = TinyConv(4)
    cond, uncond = conds()
    x = torch.randn(B, C, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    t = torch.full((B,), 0.5, dtype=torch.float64)
    got = guided_eps(net, x, t, cond, uncond, 0.0)
    assert len(net.seen) == 1 and torch.equal(net.seen[0], uncond["encoder_hidden_states"])
    torch.testing.assert_close(got, net(x, t, uncond), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- config
def test_config_accepts_negative_fake_scales_and_aliases():
    cfg = load_config("toy", ["method.cfg_train_fake=-1", "method.cfg_eval_fake=-0.5", "method.cfg_eval_real=1",
                              "method.fake_text=false", "method.gen_weighting=1_over_sigma2",
                              "method.noise_type=ddim"])
    s = MethodSettings.from_config(cfg.method)
    assert (s.cfg_train_fake, s.cfg_eval_fake, s.fake_text) == (-1.0, -0.5, False)
    assert s.gen_weighting == "one_over_sigma_squared" and s.noise_type == "ddim"


@pytest.mark.parametrize(("override", "message"), [
    ("method.cfg_eval_real=-2", "method.cfg_eval_real = -2.0: expected a value >= 0"),
    ("method.gen_weighting=1_over_sigma3", "method.gen_weighting = '1_over_sigma3': expected one of sid_legacy"),
])
def test_config_rejects_naming_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("toy", [override])
    assert message in str(info.value)
