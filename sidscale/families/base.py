"""What a model family provides, and what the rest of sidscale may assume about it.

A *family* is one folder (``sidscale/families/<name>/``) described by a ``FamilySpec`` (its
``__init__.py``) and registered by one line in ``sidscale/families/__init__.py``. Its adapter
(``ModelFamily``, ``<name>/adapter.py``) owns everything specific to a kind of teacher: loading it
from a local diffusers directory, prompt encoding, the network
call in its native parameterisation, the noise schedule (with the conversions to x0 and the
denoising target), the latent layout and VAE scale/shift, and the export / sampling layout. The
method (``sidscale/method``) sees only prediction functions, tensors and a ``NoiseSchedule``; the
trainer, checkpointing, EMA, data and the perf tools see a ``Teacher`` and a ``ModelFamily``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from sidscale.core.cond import Cond

# A conditioning: batch-first tensors by name (UNet: encoder_hidden_states [+ text_embeds,
# time_ids]; SD3 and FLUX: encoder_hidden_states, pooled_projections). Kept a dict so the method can
# concatenate [uncond; cond] and pick per sample without knowing the family.
# (x_t, noise level [B], cond) -> the family's prediction in fp32, in the schedule's convention
# (VP: eps; flow: velocity). CFG is linear in it, and ``NoiseSchedule.to_x0`` maps it to x0.
PredFn = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]
# What a network is used as when its prediction function is made (``ModelFamily.prediction_fn``): a
# family may call the net differently per role (FLUX: each role's distilled-guidance embedding);
# the others ignore it.
ROLES: tuple[str, ...] = ("generator", "fake", "teacher")


class NoiseSchedule(Protocol):
    """The one schedule interface of the method (VPSchedule, FlowSchedule in sidscale/core/schedule.py)."""

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
    def noise_only(self, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
    def to_x0(self, x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
    def dsm_target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
    # the noise a state and its x0 estimate imply (the K-step generator's ddim noise type)
    def implied_noise(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
    def flow_sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor: ...
    def generator_levels(self, settings: Any, num_steps: int) -> list: ...
    def level_tensor(self, level, batch: int, device: torch.device | str) -> torch.Tensor: ...
    def draw_loss_level(self, settings: Any, generator: torch.Generator) -> torch.Tensor: ...
    def meta(self, source: str) -> dict: ...


class Conditioner(Protocol):
    """Prompts -> ``Cond``. ``tokenize`` is a picklable callable (it runs in DataLoader workers)
    returning a LongTensor [B, ...]; ``encode_ids`` turns those ids into a Cond; ``empty(B)`` is the
    unconditional branch (the empty prompt, encoded like a prompt)."""

    tokenize: Callable[[Sequence[str]], torch.Tensor]

    def encode_ids(self, input_ids: torch.Tensor) -> Cond: ...
    def encode(self, prompts: Sequence[str]) -> Cond: ...
    def empty(self, batch: int) -> Cond: ...


# The registry (sidscale/families/__init__.py) installs its kind -> family lookup here. This module cannot
# import the registry (which imports every family, each importing this module); and the registry is always
# loaded first, because Python runs a package's __init__ before any of its submodules.
_family_lookups: list[Callable[[str], Any]] = []


def install_family_lookup(lookup: Callable[[str], Any]) -> None:
    _family_lookups[:] = [lookup]


def _registry_lookup(kind: str) -> Any:
    return _family_lookups[0](kind)


@dataclass
class Teacher:
    """A loaded, frozen teacher. ``net`` is the denoiser network (UNet2DConditionModel,
    SD3Transformer2DModel, FluxTransformer2DModel, ...); the trainable generator and fake net start as
    copies of it."""

    path: Path
    kind: str
    net: torch.nn.Module
    conditioner: Any  # a Conditioner (also an nn.Module: its weights are compared across ranks)
    schedule: Any  # a NoiseSchedule
    latent_shape: tuple[int, int, int]
    scaling_factor: float
    vae: torch.nn.Module | None
    shift_factor: float = 0.0

    @property
    def family(self) -> ModelFamily:
        return _registry_lookup(self.kind)

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> fp32 latents [B, *latent_shape] with this teacher's VAE and
        scale/shift (``families.shared.vae_encode``; pixel-space teachers: the images)."""
        from sidscale.families.shared.vae_encode import encode_images

        z = encode_images(self.vae, pixels, generator, self.scaling_factor, self.shift_factor)
        if tuple(z.shape[1:]) != tuple(self.latent_shape):
            raise ValueError(f"images {tuple(pixels.shape)} encode to latents {tuple(z.shape)}, not "
                             f"[B, {', '.join(map(str, self.latent_shape))}] (teacher.resolution?)")
        return z


class ModelFamily(Protocol):
    """One adapter module per family; see the module docstring."""

    name: str
    kinds: tuple[str, ...]
    network_folder: str  # the student's folder in a diffusers pipeline: "unet" | "transformer"

    def network_class(self) -> type: ...
    def load_teacher(self, cfg: Any, device: torch.device | str) -> Teacher: ...
    def sampling_extras(self, cfg: Any) -> dict: ...
    def prediction_fn(self, net: torch.nn.Module, schedule: Any, role: str = "generator") -> PredFn: ...
    # the adversarial method's discriminator: a FeatureTap on the net's features (families/shared/readout.py)
    def discriminator_readout(self, net: torch.nn.Module) -> Any: ...
    def schedule_from_meta(self, meta: dict, where: str) -> Any: ...
    def load_conditioner(self, directory: Path, meta: dict, dtype: torch.dtype,
                         device: torch.device | str) -> Any: ...
    def decode(self, vae: torch.nn.Module | None, latents: torch.Tensor, scaling_factor: float,
               shift_factor: float) -> torch.Tensor: ...
    def pipeline_class_name(self, kind: str) -> str | None: ...
    def pipeline_folders(self, kind: str) -> tuple[str, ...]: ...
    # The teacher's own multi-step sampler (VP: DDIM; flow: Euler in sigma) with CFG ``cfg_scale``
    # (``uncond`` may be None when it is 1): x0 latents [B, *latent_shape], from ``x_T`` when given.
    def teacher_sampler(self, teacher: Teacher, cond: Cond, uncond: Cond | None, cfg_scale: float, steps: int,
                        generator: torch.Generator | None = None, x_T: torch.Tensor | None = None
                        ) -> torch.Tensor: ...


# Images per VAE decode of a preview and of the teacher's reference. NOTE: a decode's transient grows with
# the images it decodes at once: FLUX's and SD3's VAE at 1024 px cost about 2.4 GiB per image in bf16, so a
# preview batch of 8 in one call would not fit beside training's static memory on an 80 GB card; one at a
# time keeps the preview below the training step's peak (the memory plan's ``preview`` phase counts one
# chunk; sidscale.perf.memory_plan). Eight calls instead of one cost nothing next to the sampling.
PREVIEW_DECODE_CHUNK = 1


def decode_in_chunks(family: ModelFamily, vae: torch.nn.Module | None, latents: torch.Tensor, scaling_factor: float,
                     shift_factor: float, chunk: int = PREVIEW_DECODE_CHUNK) -> torch.Tensor:
    """``family.decode`` of ``latents`` ``chunk`` images at a time, the images moved to the CPU as they come."""
    return torch.cat([family.decode(vae, latents[s:s + chunk], scaling_factor, shift_factor).cpu()
                      for s in range(0, latents.shape[0], chunk)])


def resolve(ref: str) -> Any:
    """``"package.module:attribute"`` -> the attribute (specs name their parts this way, so that reading
    the registry imports neither diffusers nor transformers)."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class ConfigSection:
    """A config section only some families read (FLUX's ``distilled_guidance``): its default values, what
    to tell someone who changed it under a family that does not read it, and ``check``, the section's own
    rules (``"module:function"``, called with the section under every kind)."""

    defaults: Mapping[str, Any]
    unused_hint: str
    check: str | None = None


@dataclass(frozen=True)
class FamilySpec:
    """Everything the rest of sidscale needs to know about one family; ``name`` is its folder's name.

    Parts are ``"module:attribute"`` references (``resolve``), imported on first use.
    - ``adapters``: teacher.kind -> its ``ModelFamily`` (several kinds may share one adapter);
    - ``presets``: the architectures the bench, the memory plan and the random-teacher writer know
      (CPU-sized ones included); ``bench_nets``: the ``PresetNets`` that builds them (and names the
      blocks gradient checkpointing wraps);
    - ``tiny``: the writer of the family's tiny teacher directory (tests, bench, CPU smoke, gpu_check),
      ``tiny(path, seed=0) -> path``, loadable by ``adapters[tiny_kind]`` with the config overrides
      ``tiny_overrides`` (teacher.kind, resolution, text length);
    - ``validate``: the family's own config rules, ``validate(cfg)`` raising ``ConfigError`` (duck-typed:
      families never import the config module); ``sections``: config sections only this family reads;
    - ``end_of_run``: ``(trainer) -> dict | None`` after the last step (the toy evaluation), or None.
    """

    name: str
    adapters: Mapping[str, str]
    tiny: str
    tiny_kind: str
    tiny_overrides: tuple[str, ...] = ()
    presets: tuple[str, ...] = ()
    bench_nets: str | None = None
    validate: str | None = None
    sections: Mapping[str, ConfigSection] = field(default_factory=dict)
    end_of_run: str | None = None

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.adapters)

    def adapter(self, kind: str) -> ModelFamily:
        return resolve(self.adapters[kind])

    def write_tiny(self, path: Path, seed: int = 0) -> Path:
        return resolve(self.tiny)(Path(path), seed=seed)

    def check_config(self, cfg: Any) -> None:
        if self.validate is not None:
            resolve(self.validate)(cfg)

    def checkpoint_block_types(self) -> tuple[type, ...]:
        """The module types diffusers wraps one by one when gradient checkpointing is on."""
        return resolve(self.bench_nets).checkpoint_block_types() if self.bench_nets else ()
