"""Model families: one adapter module per kind of teacher (see ``base.py`` for the interface).

Adding a family = its adapter module, its presets and its tests, plus one line in ``FAMILY_MODULES``
below (``teacher.kind`` values are read from here, so the config accepts the new kind).
"""

from __future__ import annotations

import importlib

from sidscale.families.base import ModelFamily

# teacher.kind -> the adapter module that serves it (imported on first use: diffusers is heavy)
FAMILY_MODULES: dict[str, str] = {
    "toy": "sidscale.families.unet_vp.adapter",
    "sd": "sidscale.families.unet_vp.adapter",
    "sdxl": "sidscale.families.unet_vp.adapter",
    "sd3": "sidscale.families.sd3.adapter",
    "toy_flow": "sidscale.families.toy.adapter",
    "flux": "sidscale.families.flux.adapter",
}
TEACHER_KINDS: tuple[str, ...] = tuple(FAMILY_MODULES)


def family_for_kind(kind: str) -> ModelFamily:
    """The adapter of ``teacher.kind`` (each module exposes ``FAMILY``)."""
    if kind not in FAMILY_MODULES:
        raise KeyError(f"teacher.kind {kind!r}: expected one of {', '.join(TEACHER_KINDS)}")
    return importlib.import_module(FAMILY_MODULES[kind]).FAMILY
