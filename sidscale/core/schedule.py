"""The noise schedules of the teacher families, behind one interface the method uses.

- ``VPSchedule``: Stable Diffusion's discrete VP schedule (SD1.5 / SD2.1 / SDXL and the toy
  teacher). A pure tensor function of ``alphas_cumprod`` (``abar``), computed in float64 and
  stored in float32 exactly as diffusers' ``DDPMScheduler.alphas_cumprod``. Noise levels are
  integer timesteps; the prediction is eps (a v-prediction teacher is converted to eps).
- ``FlowSchedule``: rectified flow (SD3 / SD3.5 / FLUX), ``x_t = (1 - sigma) x0 + sigma eps``
  with a continuous sigma in [0, 1]; the prediction is the velocity ``eps - x0``.

Both implement ``sidscale.families.base.NoiseSchedule``: ``add_noise``, ``noise_only`` (the
generator's first input), ``to_x0`` (prediction -> x0), ``dsm_target`` (what the fake net
regresses), ``flow_sigma`` (the equivalent flow-matching sigma, for loss weighting),
``implied_noise`` (the noise a state and its x0 imply: the K-step generator's ddim noise), the
generator's K levels and the per-sample draw of the loss level, both from ``MethodSettings``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


def make_alphas_cumprod(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
) -> torch.Tensor:
    """``abar_t = prod_{s<=t} (1 - beta_s)`` for t = 0 .. T-1, float32 (diffusers' convention)."""
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    else:
        raise ValueError(f"beta_schedule {beta_schedule!r} is not supported; expected 'scaled_linear' or 'linear'")
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass
class VPSchedule:
    """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` with integer timesteps t in [0, T)."""

    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"
    # ``alphas_cumprod`` on each device it was asked on. NOTE: a host-to-device copy per call is a
    # blocking pageable copy and a stream sync, several times per micro-batch, which stops the CPU
    # from running ahead of the GPU (ZeRO-3's parameter hooks rely on it running ahead).
    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r}; expected one of {PREDICTION_TYPES}")

    @classmethod
    def from_settings(
        cls,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        prediction_type: str = "epsilon",
    ) -> VPSchedule:
        abar = make_alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule)
        return cls(abar, prediction_type)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def coefficients(self, t: torch.Tensor | int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)) broadcastable against ``like`` (batch first), in fp32."""
        abar = self._table(like.device)
        t = torch.as_tensor(t, device=like.device, dtype=torch.long)
        a = abar[t]
        shape = (-1,) + (1,) * (like.dim() - 1) if a.dim() == 1 else ()
        return a.sqrt().reshape(shape), (1.0 - a).sqrt().reshape(shape)

    def _table(self, device: torch.device) -> torch.Tensor:
        src = self.alphas_cumprod
        if src.device == device:
            return src
        key = (device, id(src), src._version)  # a replaced or modified table is copied again
        table = self._tables.get(key)
        if table is None:
            for stale in [k for k in self._tables if k[0] == device]:
                del self._tables[stale]
            table = self._tables[key] = src.to(device)
        return table

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        a, s = self.coefficients(t, x0)
        return a * x0 + s * eps

    def eps_to_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        a, s = self.coefficients(t, x_t)
        return (x_t - s * eps) / a

    def x0_to_eps(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        a, s = self.coefficients(t, x_t)
        return (x_t - a * x0) / s

    def v_to_eps(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        # v = a eps - s x0  =>  eps = s x_t + a v  (since a^2 + s^2 = 1)
        a, s = self.coefficients(t, x_t)
        return s * x_t + a * v

    def eps_x0_to_v(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        a, s = self.coefficients(t, x0)
        return a * eps - s * x0

    def model_output_to_eps(self, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """The network's raw output (eps or v, per ``prediction_type``) as an eps prediction."""
        if self.prediction_type == "epsilon":
            return out
        return self.v_to_eps(x_t, out, t)

    # ------------------------------------------------------------ the method's schedule interface
    def noise_only(self, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """``add_noise(0, eps, t)`` without the zero signal term: the generator's first input."""
        _, s = self.coefficients(t, eps)
        return s * eps

    def to_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """The prediction functions of this family return eps (``model_output_to_eps``)."""
        return self.eps_to_x0(x_t, eps, t)

    def dsm_target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """SiD-LSG's fake net regresses the noise itself (eps-MSE, no timestep weighting)."""
        return eps

    def flow_sigma(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """The flow-matching sigma of the same state: ``a x0 + s eps = (a + s) x_FM`` with
        ``sigma = s / (a + s)`` (docs/flow_matching.md 1.1), broadcastable against ``like``."""
        a, s = self.coefficients(t, like)
        return s / (a + s)

    def implied_noise(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """The eps with ``add_noise(x0, eps, t) == x_t``: ``(x_t - a x0) / s``."""
        return self.x0_to_eps(x_t, x0, t)

    def generator_levels(self, settings: Any, num_steps: int) -> list[int]:
        """``t_i = int(t_init (1 - i/K))``, i = 0..K-1 (SiD-LSG's multi-step sampler; K = 1: t_init)."""
        return [int(settings.t_init * (1 - i / num_steps)) for i in range(num_steps)]

    def level_tensor(self, level: int, batch: int, device: torch.device | str) -> torch.Tensor:
        return torch.full((batch,), int(level), dtype=torch.long, device=device)

    def draw_loss_level(self, settings: Any, generator: torch.Generator) -> torch.Tensor:
        """t ~ UniformInt{t_min .. t_max-1}: one sample's timestep, shape [1], long."""
        return torch.randint(settings.t_min, settings.t_max, (1,), generator=generator)

    def meta(self, source: str) -> dict:
        return {"type": "vp", **schedule_meta(self, source)}

    def sample_timesteps(
        self, batch: int, t_min: int, t_max: int, generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """t ~ UniformInt{t_min .. t_max-1}, one per sample."""
        if not 0 <= t_min < t_max <= self.num_train_timesteps:
            raise ValueError(f"need 0 <= t_min < t_max <= {self.num_train_timesteps}, got {t_min}, {t_max}")
        t = torch.randint(t_min, t_max, (batch,), generator=generator)
        return t.to(device)


def schedule_meta(schedule: VPSchedule, source: str) -> dict:
    """The schedule a run trained with, for an export's ``sidscale.json``: the full ``abar`` array
    (float32 values, exact through JSON), so the sampler needs neither the teacher's scheduler
    file nor any beta formula. ``source`` says where training got it (informational)."""
    return {"num_train_timesteps": schedule.num_train_timesteps,
            "alphas_cumprod": [float(a) for a in schedule.alphas_cumprod.float().tolist()],
            "source": source}


def schedule_from_meta(meta: dict, prediction_type: str, where: str) -> VPSchedule:
    """Inverse of :func:`schedule_meta` (checked); ``where`` names the file for error messages."""
    try:
        abar = torch.tensor(meta["alphas_cumprod"], dtype=torch.float32)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: schedule.alphas_cumprod must be a list of numbers ({e})") from None
    n = meta.get("num_train_timesteps", abar.numel())
    ok = (abar.dim() == 1 and abar.numel() == n and bool(torch.isfinite(abar).all())
          and bool(((abar > 0) & (abar <= 1)).all()) and bool((abar[1:] <= abar[:-1]).all()))
    if not ok:
        raise ValueError(f"{where}: schedule.alphas_cumprod must be {n} non-increasing values in (0, 1] "
                         f"(num_train_timesteps = {n}); got {abar.numel()} values")
    return VPSchedule(abar, prediction_type)


@dataclass
class FlowSchedule:
    """Rectified flow: ``x_t = (1 - sigma) x0 + sigma eps``, sigma in [0, 1], velocity ``v = eps - x0``
    (docs/flow_matching.md 1.1). No timestep shift: SiD-DiT computes sigma itself and never shifts
    (its SD3-shift option defaults to off)."""

    def _sigma(self, t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
        # fp32 sigma (fp64 when the state is fp64: the exact tests), whatever the state's dtype
        t = torch.as_tensor(t, device=like.device,
                            dtype=torch.float64 if like.dtype == torch.float64 else torch.float32)
        return t.reshape((-1,) + (1,) * (like.dim() - 1)) if t.dim() == 1 else t

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        s = self._sigma(t, x0)
        return (1 - s) * x0 + s * eps

    def noise_only(self, eps: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        return self._sigma(t, eps) * eps

    def to_x0(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """``x0 = x_t - sigma v``."""
        return x_t - self._sigma(t, x_t) * v

    def to_eps(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """``eps = x_t + (1 - sigma) v``."""
        return x_t + (1 - self._sigma(t, x_t)) * v

    def dsm_target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """SiD-DiT's fake net regresses the velocity ``eps - x0`` (sum of squares, no sigma weighting)."""
        return eps - x0

    def flow_sigma(self, t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
        return self._sigma(t, like)

    def implied_noise(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """The eps with ``add_noise(x0, eps, t) == x_t``: ``(x_t - (1 - sigma) x0) / sigma`` (sigma > 0)."""
        s = self._sigma(t, x_t)
        return (x_t - (1 - s) * x0) / s

    def generator_levels(self, settings: Any, num_steps: int) -> list[float]:
        """``sigma_i = sigma_init (1 - i/K)``: 1, 0.75, 0.5, 0.25 for K = 4 (SiD-DiT's t_init = 999 / 999)."""
        return [float(settings.sigma_init) * (1 - i / num_steps) for i in range(num_steps)]

    def level_tensor(self, level: float, batch: int, device: torch.device | str) -> torch.Tensor:
        return torch.full((batch,), float(level), dtype=torch.float32, device=device)

    def draw_loss_level(self, settings: Any, generator: torch.Generator) -> torch.Tensor:
        """``sigma = sigmoid(n)``, ``n ~ N(mean, std^2)``: SiD-DiT's logit-normal (ln 2, 1.6), shape [1]."""
        n = torch.randn((1,), generator=generator)
        return torch.sigmoid(n * float(settings.sigma_logit_std) + float(settings.sigma_logit_mean))

    def meta(self, source: str) -> dict:
        return {"type": "flow", "source": source}


LN2 = math.log(2.0)


def schedule_from_export_meta(meta: dict, prediction_type: str, where: str) -> VPSchedule | FlowSchedule:
    """The schedule recorded in an export's ``sidscale.json`` (``type`` vp, the default, or flow)."""
    if isinstance(meta, dict) and meta.get("type") == "flow":
        return FlowSchedule()
    return schedule_from_meta(meta, prediction_type, where)
