"""Toy mixture (exact posterior against brute-force Bayes and Monte Carlo) and the toy teacher cache."""

import json
import threading

import pytest
import torch

from sidscale.core.schedule import VPSchedule
from sidscale.families.toy import fit as toy_teacher
from sidscale.families.toy.fit import ToyTeacherSpec, ensure_toy_teacher, load_toy_mixture
from sidscale.families.toy.mixture import ToyMixture

SCHEDULE = VPSchedule.from_settings()
SMALL = dict(
    colours={"red": [0.9, -0.8, -0.8], "blue": [-0.8, -0.8, 0.9]},
    shapes=["circle", "square"],
    components_per_prompt=3,
    std=0.2,
    size=8,
    seed=3,
)


def brute_force_posterior_mean(mix: ToyMixture, x_t, t, prompt):
    """Bayes by hand: log p(k) + sum of per-pixel Normal log-densities, then each component's
    Gaussian posterior in precision form (1/v + a^2/s^2)^-1 (mu/v + a x_t/s^2)."""
    abar = SCHEDULE.alphas_cumprod[t].double()
    a, s2, v = abar.sqrt(), 1 - abar, mix.std**2
    comps = [(p, k) for p in mix.prompts for k in range(mix.components_per_prompt) if prompt in ("", p)]
    logw, means = [], []
    for p, k in comps:
        mu = mix.means[mix.prompts.index(p), k]
        marg = torch.distributions.Normal(a * mu, torch.sqrt(a**2 * v + s2))
        logw.append(marg.log_prob(x_t.double()).sum())
        means.append((mu / v + a * x_t.double() / s2) / (1 / v + a**2 / s2))
    w = torch.softmax(torch.stack(logw), 0)
    return (w.reshape(-1, 1, 1, 1) * torch.stack(means)).sum(0)


def test_prompts_spec_roundtrip_and_errors():
    mix = ToyMixture()
    assert len(mix.prompts) == 24 and "a red circle" in mix.prompts and mix.shape == (3, 16, 16)
    spec = json.loads(json.dumps(mix.to_dict()))
    again = ToyMixture.from_dict(spec)
    assert torch.equal(again.means, mix.means) and again.prompts == mix.prompts
    assert not torch.equal(ToyMixture(seed=1).means, mix.means)
    with pytest.raises(ValueError, match="a purple circle"):
        mix.sample(["a red circle", "a purple circle"], torch.Generator().manual_seed(0))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(mix.sample(["a red circle", ""], g1), mix.sample(["a red circle", ""], g2))


def test_sample_statistics_single_component():
    mix = ToyMixture(
        colours={"red": [0.9, -0.8, -0.8]}, shapes=["ring"], components_per_prompt=1, std=0.15, size=8
    )
    x = mix.sample(["a red ring"] * 4000, torch.Generator().manual_seed(0)).double()
    assert (x.mean(0) - mix.means[0, 0]).abs().max() < 0.015
    assert x.std(0).mean().item() == pytest.approx(0.15, rel=0.02)


def test_samples_come_from_the_prompt_components():
    mix = ToyMixture(**SMALL)
    x = mix.sample(["a blue square"] * 300 + [""] * 300, torch.Generator().manual_seed(1)).double()
    flat = mix.means.reshape(mix.num_components, -1)
    nearest = torch.cdist(x.reshape(600, -1), flat).argmin(1)
    own = {mix.prompts.index("a blue square") * 3 + k for k in range(3)}
    assert set(nearest[:300].tolist()) == own
    assert set(nearest[300:].tolist()) == set(range(mix.num_components))  # "" covers everything


def test_prompt_accuracy_of_exact_and_relabelled_samples():
    """Exact samples follow their prompt; relabelled ones score 0, or 1 on colour when only the shape differs."""
    mix = ToyMixture(**SMALL)  # prompts: a red circle, a red square, a blue circle, a blue square
    prompts = [mix.prompts[i % 4] for i in range(200)]
    x = mix.sample(prompts, torch.Generator().manual_seed(2))
    assert mix.prompt_accuracy(x, prompts) == {"prompt": 1.0, "colour": 1.0}
    other_shape = [p.replace("circle", "SQ").replace("square", "circle").replace("SQ", "square") for p in prompts]
    assert mix.prompt_accuracy(x, other_shape) == {"prompt": 0.0, "colour": 1.0}
    other_colour = [p.replace("red", "X").replace("blue", "red").replace("X", "blue") for p in prompts]
    assert mix.prompt_accuracy(x, other_colour) == {"prompt": 0.0, "colour": 0.0}
    # the classifier is the nearest component mean, checked by brute force on a few images
    for i in range(5):
        d = [((x[i].double() - mix.means[p, k]) ** 2).sum() for p in range(4) for k in range(3)]
        assert mix.classify_prompts(x[i:i + 1]).item() == int(torch.stack(d).argmin()) // 3


def test_one_component_closed_form():
    mix = ToyMixture(
        colours={"red": [0.9, -0.8, -0.8]}, shapes=["circle"], components_per_prompt=1, std=0.2, size=8
    )
    x_t = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([5, 500, 990])
    abar = SCHEDULE.alphas_cumprod[t].double().reshape(-1, 1, 1, 1)
    mu, v = mix.means[0, 0], 0.04
    expected = mu + abar.sqrt() * v / (abar * v + 1 - abar) * (x_t.double() - abar.sqrt() * mu)
    got = mix.x0_posterior_mean(x_t.double(), t, ["a red circle"] * 3, SCHEDULE)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("t", [0, 30, 300, 700, 999])
def test_posterior_mean_matches_brute_force_bayes(t):
    mix = ToyMixture(**SMALL)
    prompts = ["a red circle", "", "a blue square", ""]
    g = torch.Generator().manual_seed(t)
    # x_t from the model itself (typical points) and, for the "" rows, between two prompts' components
    x0 = mix.sample(["a red circle", "a blue circle", "a blue square", "a red square"], g)
    x_t = SCHEDULE.add_noise(x0, torch.randn(x0.shape, generator=g), t).double()
    got = mix.x0_posterior_mean(x_t, t, prompts, SCHEDULE)
    for i, p in enumerate(prompts):
        torch.testing.assert_close(
            got[i], brute_force_posterior_mean(mix, x_t[i], t, p), rtol=1e-9, atol=1e-9
        )
    # eps_exact is the same prediction expressed as noise: x_t = a x0_hat + s eps_hat
    eps = mix.eps_exact(x_t, t, prompts, SCHEDULE)
    torch.testing.assert_close(SCHEDULE.add_noise(got, eps, t), x_t)


def test_posterior_mean_matches_monte_carlo():
    # E[x0 | x_t] = E_{x0 ~ p}[x0 p(x_t|x0)] / E_{x0 ~ p}[p(x_t|x0)], self-normalised over prior draws;
    # at t=800 the likelihood is broad enough for 100k draws to estimate it well
    mix = ToyMixture(**SMALL)
    t, g = 800, torch.Generator().manual_seed(4)
    x0 = mix.sample([""] * 100_000, g).double()
    x_t = SCHEDULE.add_noise(
        mix.sample(["a red square"], g), torch.randn(1, 3, 8, 8, generator=g), t
    ).double()
    a, s = (c.double() for c in SCHEDULE.coefficients(t, x_t))
    logw = -((x_t - a * x0) ** 2).sum(dim=(1, 2, 3)) / (2 * s**2)
    w = torch.softmax(logw, 0)
    mc = (w.reshape(-1, 1, 1, 1) * x0).sum(0)
    ess = 1 / (w**2).sum()
    assert ess > 1000
    exact = mix.x0_posterior_mean(x_t, t, [""], SCHEDULE)[0]
    assert (mc - exact).abs().max() < 0.03


# ------------------------------------------------------------------------------- toy teacher
TINY_SPEC = dict(
    mixture=ToyMixture(**SMALL).to_dict(),
    unet={"block_out_channels": [16, 32], "norm_num_groups": 8},
    text_hidden_size=16,
    fit_steps=4,
    batch_size=4,
    warmup_steps=1,
    eval_samples=16,
    eval_steps=2,
)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "unet" / "diffusion_pytorch_model.safetensors"))


def test_teacher_dir_layout_loads_and_is_deterministic(tmp_path):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    spec = ToyTeacherSpec(**TINY_SPEC)
    first = ensure_toy_teacher(tmp_path / "a", spec)
    second = ensure_toy_teacher(tmp_path / "b", spec)
    assert first.name == second.name == f"toy-teacher-{spec.digest()}"
    w1, w2 = _weights(first), _weights(second)
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    init = toy_teacher.build_tiny_unet(
        spec.seed, in_channels=3, sample_size=8, cross_attention_dim=16, **spec.unet
    )
    assert any(not torch.equal(w1[k], v) for k, v in init.state_dict().items())  # it did train

    unet = UNet2DConditionModel.from_pretrained(first / "unet")
    assert unet.config.in_channels == 3 and unet.config.cross_attention_dim == 16
    assert CLIPTextModel.from_pretrained(first / "text_encoder").config.hidden_size == 16
    tok = CLIPTokenizer.from_pretrained(first / "tokenizer")
    assert len(tok) == 49408 and tok.model_max_length == 77
    sched = DDPMScheduler.from_pretrained(first / "scheduler")
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.prediction_type == "epsilon"
    torch.testing.assert_close(sched.alphas_cumprod, SCHEDULE.alphas_cumprod)
    assert load_toy_mixture(first).to_dict() == spec.mixture
    report = json.loads((first / "fit_report.json").read_text())
    assert (
        report["fit_steps"] == 4 and {"teacher_frechet", "random_init_frechet", "final_loss",
                                      "teacher_prompt_accuracy", "teacher_colour_accuracy"} <= report.keys()
    )
    assert not [p for p in (tmp_path / "a").iterdir() if ".tmp-" in p.name]  # no leftovers


def test_cache_hit_does_not_refit_and_concurrent_calls_fit_once(tmp_path, monkeypatch):
    calls = []
    real_fit = toy_teacher._fit

    def counting_fit(spec, out_dir):
        calls.append(out_dir)
        return real_fit(spec, out_dir)

    monkeypatch.setattr(toy_teacher, "_fit", counting_fit)
    spec = ToyTeacherSpec(**{**TINY_SPEC, "eval_samples": 0})
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_toy_teacher(tmp_path, spec))) for _ in range(2)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]

    def no_fit(spec, out_dir):
        raise AssertionError("cache hit must not refit")

    monkeypatch.setattr(toy_teacher, "_fit", no_fit)
    assert ensure_toy_teacher(tmp_path, spec) == results[0]
    other = ToyTeacherSpec(**{**TINY_SPEC, "eval_samples": 0, "seed": 1})
    assert other.digest() != spec.digest()
    with pytest.raises(AssertionError, match="must not refit"):
        ensure_toy_teacher(tmp_path, other)
