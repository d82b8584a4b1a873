"""The built-in toy teachers: a tiny SD-architecture UNet fitted to a known Gaussian mixture.

It is the project's default, CPU-runnable ground truth: a real ``UNet2DConditionModel`` eps-model,
conditioned through a tiny ``CLIPTextModel`` (fitted with the UNet, frozen afterwards, like a
real teacher's encoder) and the real CLIP tokenizer, on a
distribution whose exact samples and exact score we have (``sidscale.families.toy.mixture``). So a
distilled one-step generator can be scored against exact samples in seconds.

The UNet regresses onto the EXACT eps (the mixture's posterior mean), not onto the noise that
made x_t: same minimiser, far lower variance, so a few hundred CPU steps suffice.

Two parameterisations of the same UNet (``ToyTeacherSpec.parameterisation``):

- ``"eps"`` (teacher.kind ``toy``): SD's discrete VP schedule, the UNet predicts eps at the integer
  timestep t (a DDPM scheduler is written beside it).
- ``"flow"`` (teacher.kind ``toy_flow``): rectified flow ``x_t = (1 - sigma) x0 + sigma eps``, the
  UNet predicts the velocity ``eps - x0`` at ``timestep = 1000 sigma`` (as SD3's transformer;
  ``sidscale/families/toy/adapter.py``), fitted to the exact velocity; a FlowMatchEuler scheduler
  (shift 1) is written beside it. Its fit report samples with the flow Euler sampler.

Usage::

    python -m sidscale.families.toy.fit --cache-dir ~/.cache/sidscale [--parameterisation flow]

writes ``<cache-dir>/toy-teacher-<hash of spec>/`` (flow: ``toy-flow-teacher-<hash>/``) in
diffusers layout (unet/, text_encoder/, tokenizer/, scheduler/) plus toy_mixture.json and
fit_report.json, and prints the report.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sidscale.core.cond import Cond
from sidscale.core.schedule import FlowSchedule, VPSchedule
from sidscale.eval.frechet import toy_frechet
from sidscale.families.shared.clip import ClipConditioner, unet_kwargs
from sidscale.families.shared.samplers import ddim_sample, flow_sample
from sidscale.families.shared.tokenizers import build_clip_tokenizer
from sidscale.families.toy.mixture import ToyMixture
from sidscale.families.unet_vp.tiny import SD_SCHEDULER_CONFIG, build_tiny_text_encoder, build_tiny_unet
from sidscale.terminal import progress

log = logging.getLogger(__name__)
# The UNet reads timestep = TIME_SCALE * sigma, as SD3's transformer (docs/flow_matching.md 1.1): the flow toy
# teacher is fitted with it here, and the toy_flow adapter (sidscale/families/toy/adapter.py) reads it from here.
TIME_SCALE = 1000.0

# Bump when the fitting code changes in a way that changes the weights: it is part of the hash,
# so stale cached teachers are not reused.
FIT_VERSION = 2  # 2: the text encoder is fitted with the UNet (1: frozen at random init)
# The same for the flow fit only (in the hash of flow specs only, so the eps teachers keep theirs).
FLOW_FIT_VERSION = 1
PARAMETERISATIONS = ("eps", "flow")
# The flow teacher's scheduler: diffusers' rectified-flow Euler scheduler without SD3's shift.
FLOW_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 1.0}


@dataclasses.dataclass
class ToyTeacherSpec:
    """Everything that determines the toy teacher's weights (its hash names the cache entry)."""

    mixture: dict[str, Any] = dataclasses.field(default_factory=lambda: ToyMixture().to_dict())
    unet: dict[str, Any] = dataclasses.field(default_factory=dict)  # overrides of tiny_unet_config
    text_hidden_size: int = 32
    # NOTE: a random frozen tiny CLIP maps the 24 prompts to nearly the same embedding, and the
    # UNet fitted on it ignored the prompt (7% of its samples matched their prompt, chance is 4%).
    # Fitting the text encoder too makes the prompts separable, as a real teacher's are.
    train_text_encoder: bool = True
    # The prompt (a colour) is decided at high noise, where an eps error weighs a^2 times the x0
    # error: the loss per sample is weighted by clamp((1 - abar) / abar, 1, max) so that those steps
    # count (1 = plain eps MSE).
    high_noise_weight_max: float = 20.0
    fit_steps: int = 400
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 20
    uncond_prob: float = 0.1
    seed: int = 0
    # the report: teacher DDIM samples (cfg 1) vs exact mixture samples, in toy_features space
    eval_samples: int = 256
    eval_steps: int = 25
    eval_random_init: bool = True
    # "eps" (VP, teacher.kind toy) | "flow" (rectified flow, velocity, teacher.kind toy_flow). The
    # flow fit draws sigma ~ U(0, 1) and regresses the velocity with plain MSE (see _fit); it ignores
    # high_noise_weight_max.
    parameterisation: str = "eps"

    def __post_init__(self) -> None:
        if self.parameterisation not in PARAMETERISATIONS:
            raise ValueError(f"ToyTeacherSpec.parameterisation = {self.parameterisation!r}: expected one of "
                             f"{', '.join(PARAMETERISATIONS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def is_flow(self) -> bool:
        return self.parameterisation == "flow"

    def digest(self) -> str:
        d = {"fit_version": FIT_VERSION, **self.to_dict()}
        if self.is_flow:
            d["flow_fit_version"] = FLOW_FIT_VERSION
        else:
            # NOTE: the eps spec hashes as it did before the field existed, so cached teachers stay valid.
            del d["parameterisation"]
        blob = json.dumps(d, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def cache_name(self) -> str:
        return f"toy-{'flow-' if self.is_flow else ''}teacher-{self.digest()}"


def load_toy_mixture(teacher_dir: str | os.PathLike) -> ToyMixture:
    """The mixture a toy teacher was fitted on (from its ``toy_mixture.json``)."""
    path = Path(teacher_dir) / "toy_mixture.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {teacher_dir} is not a toy teacher directory")
    return ToyMixture.from_dict(json.loads(path.read_text()))


def unet_eps_fn(unet: torch.nn.Module):
    """Adapt a diffusers UNet to the ``eps_fn(x_t, t, cond)`` protocol of ``ddim_sample``."""

    def eps_fn(x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return unet(x_t, t, **unet_kwargs(cond)).sample

    return eps_fn


def unet_velocity_fn(unet: torch.nn.Module, time_scale: float = TIME_SCALE):
    """A flow toy teacher's UNet as ``v_fn(x_t, sigma, cond)`` for ``flow_sample``."""

    def v_fn(x_t: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        return unet(x_t, sigma.float() * time_scale, **unet_kwargs(cond)).sample

    return v_fn


# ------------------------------------------------------------------------------------------ fit
def _lr_at(step: int, spec: ToyTeacherSpec) -> float:
    """Linear warmup, then cosine decay to 5% of lr: the decay buys most of the final accuracy."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    frac = (step - spec.warmup_steps) / max(1, spec.fit_steps - spec.warmup_steps)
    return spec.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def _fit(spec: ToyTeacherSpec, out_dir: Path) -> dict[str, Any]:
    """Fit the teacher and write the whole teacher directory into ``out_dir`` (which exists)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    start = time.perf_counter()
    mixture = ToyMixture.from_dict(spec.mixture)
    schedule = _schedule(spec)
    channels, size, _ = mixture.shape
    unet_kw = dict(
        in_channels=channels, sample_size=size, cross_attention_dim=spec.text_hidden_size, **spec.unet
    )
    unet = build_tiny_unet(spec.seed, **unet_kw)
    text_encoder = build_tiny_text_encoder(spec.seed + 1, hidden_size=spec.text_hidden_size)
    tokenizer = build_clip_tokenizer(out_dir / "tokenizer", model_max_length=77)
    conditioner = ClipConditioner(tokenizer, text_encoder)

    # There are only P + 1 distinct prompts: tokenise them once (and, with spec.train_text_encoder
    # off, encode them once).
    prompts = mixture.prompts
    prompt_ids = conditioner.tokenize([*prompts, ""])
    params = list(unet.parameters())
    if spec.train_text_encoder:
        text_encoder.requires_grad_(True).train()
        params += list(text_encoder.parameters())

    def encode_table() -> torch.Tensor:  # [P+1, 77, D]; an autograd graph only while the encoder trains
        return text_encoder(prompt_ids).last_hidden_state

    table = None if spec.train_text_encoder else encode_table()
    gen = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.Adam(params, lr=spec.lr)
    unet.train()
    losses: list[float] = []
    # NOTE: a bar with ETA (rank 0 fits while the other ranks wait): minutes on a busy CPU. The loss goes
    # into its postfix; the periodic log line is kept at debug level so it does not break the bar.
    bar = progress(spec.fit_steps, f"fitting the {spec.parameterisation} toy teacher (once; cached)",
                   _is_rank0())
    for step in range(spec.fit_steps):
        b = spec.batch_size
        idx = torch.randint(0, len(prompts), (b,), generator=gen)
        x0 = mixture.sample([prompts[i] for i in idx], gen)
        # prompts are uniform, so x0 drawn per prompt and relabelled "" is a draw of the marginal
        drop = torch.rand(b, generator=gen) < spec.uncond_prob
        idx = torch.where(drop, len(prompts), idx)
        labels = [prompts[i] if i < len(prompts) else "" for i in idx]
        if spec.is_flow:
            # NOTE: sigma ~ U(0, 1) covers the Euler sampler's levels evenly and both ends of the SiD-DiT
            # loss levels (logit-normal). Plain velocity MSE: a velocity error is an x0 error / sigma, so
            # high-noise steps already count at least as much (in x0 units) as in the eps fit's clamped
            # weighting, without its fall-off at sigma -> 1, where the flow sampler and generator start.
            t = torch.rand(b, generator=gen)
            x_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=gen), t)
            target = mixture.velocity_exact(x_t, t, labels, schedule)
            weight = torch.ones(b)
        else:
            t = torch.randint(0, schedule.num_train_timesteps, (b,), generator=gen)
            x_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=gen), t)
            target = mixture.eps_exact(x_t, t, labels, schedule)
            abar = schedule.alphas_cumprod[t]
            weight = ((1 - abar) / abar).clamp(1.0, spec.high_noise_weight_max)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, spec)
        if spec.train_text_encoder:
            table = encode_table()
        timestep = t * TIME_SCALE if spec.is_flow else t
        pred = unet(x_t, timestep, encoder_hidden_states=table[idx]).sample
        loss = (weight * (pred - target).square().mean(dim=(1, 2, 3))).sum() / weight.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.5f}", refresh=False)
        bar.update(1)
        if step % 50 == 0 or step == spec.fit_steps - 1:
            log.debug("toy teacher fit step %d/%d loss %.5f", step, spec.fit_steps, loss.item())
    bar.close()
    fit_seconds = time.perf_counter() - start
    unet.eval()
    text_encoder.requires_grad_(False).eval()
    table = encode_table()

    report: dict[str, Any] = {
        "spec_digest": spec.digest(),
        "parameterisation": spec.parameterisation,
        "fit_steps": spec.fit_steps,
        "batch_size": spec.batch_size,
        "final_loss": float(sum(losses[-20:]) / len(losses[-20:])) if losses else None,
        "first_loss": losses[0] if losses else None,
        "fit_seconds": round(fit_seconds, 2),
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
    }
    if spec.eval_samples > 1:
        eval_start = time.perf_counter()
        report.update(_evaluate(spec, mixture, schedule, unet, table, unet_kw))
        report["eval_seconds"] = round(time.perf_counter() - eval_start, 2)
    report["total_seconds"] = round(time.perf_counter() - start, 2)

    unet.save_pretrained(out_dir / "unet")
    text_encoder.save_pretrained(out_dir / "text_encoder")
    if spec.is_flow:
        FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER_CONFIG).save_pretrained(out_dir / "scheduler")
    else:
        DDPMScheduler(**SD_SCHEDULER_CONFIG).save_pretrained(out_dir / "scheduler")
    (out_dir / "toy_mixture.json").write_text(json.dumps(mixture.to_dict(), indent=2))
    (out_dir / "toy_teacher_spec.json").write_text(json.dumps(spec.to_dict(), indent=2))
    # written last: its presence marks a complete directory
    (out_dir / "fit_report.json").write_text(json.dumps(report, indent=2))
    return report


def _is_rank0() -> bool:
    from sidscale.distributed import comm

    return comm.rank() == 0


def _schedule(spec: ToyTeacherSpec) -> VPSchedule | FlowSchedule:
    if spec.is_flow:
        return FlowSchedule()
    return VPSchedule.from_settings(
        **{
            k: SD_SCHEDULER_CONFIG[k]
            for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
        }
    )


@torch.no_grad()
def _evaluate(
    spec: ToyTeacherSpec,
    mixture: ToyMixture,
    schedule: VPSchedule | FlowSchedule,
    unet: torch.nn.Module,
    table: torch.Tensor,
    unet_kw: dict[str, Any],
) -> dict[str, Any]:
    """Toy Frechet of DDIM samples (cfg 1; flow: the flow Euler sampler) vs exact samples, with the
    floors that make it readable."""
    n, prompts = spec.eval_samples, mixture.prompts
    gen = torch.Generator().manual_seed(spec.seed + 12345)
    idx = torch.randint(0, len(prompts), (n,), generator=gen)
    labels = [prompts[i] for i in idx]
    reference = mixture.sample(labels, gen)
    x_T = torch.randn((n, *mixture.shape), generator=gen)
    cond = {"encoder_hidden_states": table[idx]}

    sampler = flow_sample if spec.is_flow else ddim_sample
    net_fn = unet_velocity_fn if spec.is_flow else unet_eps_fn
    # a bar over the samplers' network calls (cfg 1: one per step): the report takes as long as the fit
    bar = progress((3 if spec.eval_random_init else 2) * spec.eval_steps, "toy teacher fit report", _is_rank0(),
                   unit="step")

    def sample(fn) -> torch.Tensor:
        def counted(*args):
            out = fn(*args)
            bar.update(1)
            return out

        return sampler(counted, schedule, x_T.shape, cond, None, 1.0, spec.eval_steps, x_T=x_T)

    def accuracy(x: torch.Tensor, name: str) -> dict[str, float]:
        return {f"{name}_{k}_accuracy": v for k, v in mixture.prompt_accuracy(x, labels).items()}

    def exact_prediction(x_t, t, c):  # the sampler with the true score: discretisation error only
        p = [labels[i] for i in range(x_t.shape[0])]
        if spec.is_flow:
            return mixture.velocity_exact(x_t, t, p, schedule)
        return mixture.eps_exact(x_t, t, p, schedule)

    exact_name = "exact_velocity_euler" if spec.is_flow else "exact_eps_ddim"
    teacher_x, exact_x = sample(net_fn(unet)), sample(exact_prediction)
    out = {
        "eval_samples": n,
        "eval_steps": spec.eval_steps,
        "teacher_frechet": toy_frechet(teacher_x, reference),
        f"{exact_name}_frechet": toy_frechet(exact_x, reference),
        "exact_vs_exact_frechet": toy_frechet(mixture.sample(labels, gen), reference),
        **accuracy(reference, "exact"), **accuracy(teacher_x, "teacher"), **accuracy(exact_x, exact_name),
    }
    if spec.eval_random_init:
        out["random_init_frechet"] = toy_frechet(sample(net_fn(build_tiny_unet(spec.seed, **unet_kw).eval())),
                                                 reference)
    bar.close()
    return out


# ---------------------------------------------------------------------------------------- cache
@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _is_complete(path: Path) -> bool:
    return (path / "fit_report.json").is_file()


def ensure_toy_teacher(cache_dir: str | os.PathLike, spec: ToyTeacherSpec | None = None) -> Path:
    """Path of the fitted toy teacher for ``spec``, fitting it first if it is not cached.

    Safe with concurrent callers: a lock file serialises the fit (the others wait and then hit
    the cache), and the directory appears atomically by rename, so a reader never sees a
    half-written teacher; if the target appears anyway (lock-less filesystem), the existing
    one is kept.
    """
    spec = spec or ToyTeacherSpec()
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / spec.cache_name
    if _is_complete(target):
        return target
    with _file_lock(cache / f".{target.name}.lock"):
        if _is_complete(target):
            return target
        # holding the lock, any temp dir of this target is a leftover of a killed fit
        for stale in cache.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{target.name}.tmp-"))
        try:
            report = _fit(spec, tmp)
            log.info("toy teacher fitted: %s", report)
            try:
                os.rename(tmp, target)
            except OSError:
                if not _is_complete(target):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_teacher_dir(cfg: Any) -> Path:
    """The teacher directory; for the built-in toy teachers (kinds toy, toy_flow), fitted once and cached."""
    if cfg.is_toy and not cfg.path:
        spec = ToyTeacherSpec(parameterisation="flow" if cfg.kind == "toy_flow" else "eps")
        return ensure_toy_teacher(Path(cfg.cache_dir).expanduser(), spec)
    return Path(cfg.path).expanduser()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", required=True, help="where toy-teacher-<hash>/ is written")
    parser.add_argument("--fit-steps", type=int, default=None, help="override the default spec's fit steps")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--parameterisation", choices=PARAMETERISATIONS, default="eps",
                        help="eps: the VP toy teacher (teacher.kind toy); flow: the rectified-flow one (toy_flow)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from sidscale.terminal import quiet_third_party

    quiet_third_party()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = ToyTeacherSpec(parameterisation=args.parameterisation)
    if args.fit_steps is not None:
        spec.fit_steps = args.fit_steps
    if args.seed is not None:
        spec.seed = args.seed
    path = ensure_toy_teacher(args.cache_dir, spec)
    print(path)
    print((path / "fit_report.json").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
