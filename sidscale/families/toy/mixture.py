"""A conditional Gaussian mixture of small images: the toy world whose exact score we know.

Each prompt ("a red circle", ...) owns K components; component k's mean is the prompt's shape,
drawn procedurally in the prompt's colour at its own position and size, and every component has
the same isotropic std. The empty prompt "" is the unconditional distribution: the uniform
mixture over all components of all prompts (prompts are equally likely, so this is exactly the
marginal of the conditional model, which is what classifier-free guidance assumes).

Because every component is Gaussian, the denoiser is closed form: for
``x_t = a x0 + s eps`` (VP: ``a = sqrt(abar_t)``, ``s = sqrt(1 - abar_t)``; rectified flow:
``a = 1 - sigma``, ``s = sigma``) and component k with mean mu_k and variance v,
``x_t | k ~ N(a mu_k, (a^2 v + s^2) I)`` and
``E[x0 | x_t, k] = mu_k + a v / (a^2 v + s^2) (x_t - a mu_k)``;
the posterior over components is a softmax of the Gaussian log-likelihoods (computed in fp64,
because at small t the likelihoods differ by thousands of nats).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import torch

from sidscale.core.schedule import FlowSchedule, VPSchedule

Schedule = VPSchedule | FlowSchedule  # t: an integer timestep (VP) or a sigma in [0, 1] (flow)

# Colours in the [-1, 1] pixel range; kept inside +-0.9 so samples stay mostly in range.
DEFAULT_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, -0.8, -0.8),
    "green": (-0.8, 0.9, -0.8),
    "blue": (-0.8, -0.8, 0.9),
    "yellow": (0.9, 0.9, -0.8),
    "cyan": (-0.8, 0.9, 0.9),
    "white": (0.9, 0.9, 0.9),
}
SHAPES = ("circle", "square", "triangle", "ring")


def _signed_distance(
    shape: str, x: torch.Tensor, y: torch.Tensor, cx: float, cy: float, r: float
) -> torch.Tensor:
    """Approximate signed distance (pixels, negative inside) of a shape of radius ``r`` at (cx, cy)."""
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return torch.sqrt(dx**2 + dy**2) - r
    if shape == "square":
        return torch.maximum(dx.abs(), dy.abs()) - 0.85 * r
    if shape == "triangle":
        # upward triangle as the intersection of three half-planes (image y grows downward)
        d = None
        for angle in (90.0, 210.0, 330.0):
            nx, ny = math.cos(math.radians(angle)), math.sin(math.radians(angle))
            e = nx * dx + ny * dy - 0.6 * r
            d = e if d is None else torch.maximum(d, e)
        return d
    if shape == "ring":
        return (torch.sqrt(dx**2 + dy**2) - 0.75 * r).abs() - 0.3 * r
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def draw_shape(
    shape: str, colour: Sequence[float], background: float, size: int, cx: float, cy: float, r: float
) -> torch.Tensor:
    """A [C, size, size] float64 image: anti-aliased shape in ``colour`` on a flat background.

    The one-pixel soft edge keeps the means smooth, which a tiny UNet fits far more easily.
    """
    coords = torch.arange(size, dtype=torch.float64) + 0.5
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    mask = torch.sigmoid(-_signed_distance(shape, x, y, cx, cy, r) / 0.5)
    col = torch.tensor(colour, dtype=torch.float64).reshape(-1, 1, 1)
    return background + mask * (col - background)


class ToyMixture:
    """Conditional isotropic Gaussian mixture over [C, H, W] images, keyed by prompt.

    Fully determined by its spec (``to_dict``): the component means are regenerated from ``seed``
    with Python's ``random.Random``, whose stream is stable across versions and platforms.
    """

    def __init__(
        self,
        colours: dict[str, Sequence[float]] | None = None,
        shapes: Sequence[str] = SHAPES,
        components_per_prompt: int = 3,
        std: float = 0.15,
        size: int = 16,
        background: float = -0.5,
        seed: int = 0,
    ):
        colours = dict(DEFAULT_COLOURS if colours is None else colours)
        if not colours or not shapes:
            raise ValueError("ToyMixture needs at least one colour and one shape")
        if components_per_prompt < 1 or std <= 0:
            raise ValueError(
                f"need components_per_prompt >= 1 and std > 0, got {components_per_prompt}, {std}"
            )
        channels = {len(c) for c in colours.values()}
        if len(channels) != 1:
            raise ValueError("all colours must have the same number of channels")
        self.colours = {k: tuple(float(v) for v in c) for k, c in colours.items()}
        self.shapes = tuple(shapes)
        self.components_per_prompt = int(components_per_prompt)
        self.std = float(std)
        self.size = int(size)
        self.background = float(background)
        self.seed = int(seed)
        self.channels = channels.pop()
        self.prompts: list[str] = [f"a {c} {s}" for c in self.colours for s in self.shapes]
        self._index = {p: i for i, p in enumerate(self.prompts)}
        self.means = self._make_means()  # [P, K, C, H, W] float64

    # ------------------------------------------------------------------ spec
    def _make_means(self) -> torch.Tensor:
        rng = random.Random(self.seed)
        out = torch.empty(
            len(self.prompts),
            self.components_per_prompt,
            self.channels,
            self.size,
            self.size,
            dtype=torch.float64,
        )
        for i, prompt in enumerate(self.prompts):
            _, colour, shape = prompt.split(" ", 2)
            for k in range(self.components_per_prompt):
                r = rng.uniform(0.22, 0.34) * self.size
                margin = r + 0.05 * self.size
                cx = rng.uniform(margin, self.size - margin)
                cy = rng.uniform(margin, self.size - margin)
                out[i, k] = draw_shape(shape, self.colours[colour], self.background, self.size, cx, cy, r)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "colours": {k: list(v) for k, v in self.colours.items()},
            "shapes": list(self.shapes),
            "components_per_prompt": self.components_per_prompt,
            "std": self.std,
            "size": self.size,
            "background": self.background,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ToyMixture:
        return cls(**d)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    @property
    def num_components(self) -> int:
        return len(self.prompts) * self.components_per_prompt

    def prompt_index(self, prompt: str) -> int:
        """Index of a prompt in ``prompts``; -1 for the unconditional prompt ""."""
        if prompt == "":
            return -1
        try:
            return self._index[prompt]
        except KeyError:
            raise ValueError(
                f"prompt {prompt!r} is not in the toy mixture; known prompts are e.g. {self.prompts[:3]} "
                f"(or '' for unconditional)"
            ) from None

    def component_mask(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, P*K] bool: which flattened components each prompt's distribution uses."""
        mask = torch.zeros(len(prompts), len(self.prompts), self.components_per_prompt, dtype=torch.bool)
        for b, p in enumerate(prompts):
            i = self.prompt_index(p)
            if i < 0:
                mask[b] = True
            else:
                mask[b, i] = True
        return mask.reshape(len(prompts), -1)

    # --------------------------------------------------------------- sampling
    def sample(self, prompts: Sequence[str], generator: torch.Generator | None = None) -> torch.Tensor:
        """x0 ~ p(x0 | prompt) for each prompt, [B, C, H, W] float32 on CPU."""
        mask = self.component_mask(prompts)
        # components are equally likely within a prompt (and, for "", over all prompts)
        comp = torch.multinomial(mask.double(), 1, generator=generator).squeeze(1)
        mu = self.means.reshape(self.num_components, *self.shape)[comp]
        noise = torch.randn(mu.shape, generator=generator, dtype=torch.float64)
        return (mu + self.std * noise).float()

    def classify_prompts(self, x0: torch.Tensor) -> torch.Tensor:
        """[B] long: the prompt whose component mean is nearest to each image (squared L2).

        With equal weights and one isotropic std this is the Bayes classifier of a clean sample.
        Exact samples are classified right (measured: 100% of 480; components of different
        prompts differ in colour or shape over many pixels, far beyond the per-pixel noise).
        """
        if tuple(x0.shape[1:]) != self.shape:
            raise ValueError(f"images of shape {tuple(x0.shape[1:])} for a toy mixture of {self.shape} images")
        mu = self.means.reshape(self.num_components, -1).to(x0.device, torch.float64)
        d2 = torch.cdist(x0.reshape(x0.shape[0], -1).double(), mu)
        return d2.argmin(dim=1) // self.components_per_prompt

    def prompt_accuracy(self, x0: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
        """Fractions of images classified as their own prompt ("prompt"; chance 1 / #prompts) and as
        a prompt of their own colour ("colour"; chance 1 / #colours)."""
        target = torch.tensor([self.prompt_index(p) for p in prompts], device=x0.device)
        got = self.classify_prompts(x0)
        shapes = len(self.shapes)  # prompts are ordered colour-major: index = colour * #shapes + shape
        return {"prompt": float((got == target).double().mean()),
                "colour": float((got // shapes == target // shapes).double().mean())}

    # ---------------------------------------------------------- exact score
    def component_posterior(
        self, x_t: torch.Tensor, t: torch.Tensor | int, prompts: Sequence[str], schedule: Schedule
    ) -> torch.Tensor:
        """[B, P*K] float64: p(k | x_t, prompt)."""
        x, a, s2 = self._prep(x_t, t, schedule)
        mu = self.means.reshape(self.num_components, -1).to(x.device)
        var = a**2 * self.std**2 + s2  # [B, 1]
        # ||x - a mu||^2 expanded; the shared log-normaliser cancels within a sample
        sq = (x**2).sum(1, keepdim=True) - 2 * a * (x @ mu.T) + a**2 * (mu**2).sum(1)[None]
        logp = -0.5 * sq / var
        logp = logp.masked_fill(~self.component_mask(prompts).to(x.device), float("-inf"))
        return torch.softmax(logp, dim=1)

    def x0_posterior_mean(
        self, x_t: torch.Tensor, t: torch.Tensor | int, prompts: Sequence[str], schedule: Schedule
    ) -> torch.Tensor:
        """E[x0 | x_t, prompt] exactly, in the dtype of ``x_t``."""
        if len(prompts) != x_t.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for a batch of {x_t.shape[0]}")
        w = self.component_posterior(x_t, t, prompts, schedule)
        x, a, s2 = self._prep(x_t, t, schedule)
        mu = self.means.reshape(self.num_components, -1).to(x.device)
        v = self.std**2
        gain = a * v / (a**2 * v + s2)  # [B, 1]
        # sum_k w_k (mu_k + gain (x - a mu_k)) = (1 - a gain) E_w[mu] + gain x
        mean = (1 - a * gain) * (w @ mu) + gain * x
        return mean.reshape(x_t.shape).to(x_t.dtype)

    def eps_exact(
        self, x_t: torch.Tensor, t: torch.Tensor | int, prompts: Sequence[str], schedule: VPSchedule
    ) -> torch.Tensor:
        """The ideal eps-prediction E[eps | x_t, prompt]."""
        x0 = self.x0_posterior_mean(x_t.double(), t, prompts, schedule)
        return schedule.x0_to_eps(x_t.double(), x0, t).to(x_t.dtype)

    def velocity_exact(
        self, x_t: torch.Tensor, sigma: torch.Tensor | float, prompts: Sequence[str],
        schedule: FlowSchedule | None = None,
    ) -> torch.Tensor:
        """The ideal velocity ``E[eps - x0 | x_t, prompt]`` for ``x_t = (1 - sigma) x0 + sigma eps``.

        Written without dividing by sigma (finite down to sigma = 0, where it is ``-x_t``):
        per component ``E[eps | x_t, k] = s (x - a mu_k) / (a^2 v + s^2)``, so with ``m = E_w[mu]``
        ``v = (s - a v) (x - a m) / (a^2 v + s^2) - m``.
        """
        schedule = schedule or FlowSchedule()
        if len(prompts) != x_t.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for a batch of {x_t.shape[0]}")
        w = self.component_posterior(x_t, sigma, prompts, schedule)
        x, a, s2 = self._prep(x_t, sigma, schedule)
        m = w @ self.means.reshape(self.num_components, -1).to(x.device)
        var = a**2 * self.std**2 + s2
        vel = (s2.sqrt() - a * self.std**2) * (x - a * m) / var - m
        return vel.reshape(x_t.shape).to(x_t.dtype)

    def _prep(
        self, x_t: torch.Tensor, t: torch.Tensor | int | float, schedule: Schedule
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t flattened, a [B, 1], s^2 [B, 1]) in float64."""
        if tuple(x_t.shape[1:]) != self.shape:
            raise ValueError(
                f"x_t has shape {tuple(x_t.shape)}, expected [B, {', '.join(map(str, self.shape))}]"
            )
        x = x_t.reshape(x_t.shape[0], -1).double()
        if isinstance(schedule, FlowSchedule):
            sigma = torch.as_tensor(t, device=x.device, dtype=torch.float64).reshape(-1, 1).expand(x.shape[0], 1)
            return x, 1.0 - sigma, sigma**2
        abar = schedule.alphas_cumprod.to(x.device, torch.float64)
        t = torch.as_tensor(t, device=x.device, dtype=torch.long)
        ab = abar[t].reshape(-1, 1).expand(x.shape[0], 1)
        return x, ab.sqrt(), 1.0 - ab
