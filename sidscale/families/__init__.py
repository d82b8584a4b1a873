"""Model families: one folder per family, described by a ``FamilySpec`` (see ``base.py``).

Adding a family = its folder ``sidscale/families/<name>/`` (``__init__.py`` holding ``SPEC``, an
adapter, its conditioning, presets and tiny teacher) plus one line in ``SPECS`` below; the config
accepts its kinds and tests/families/test_family_contract.py runs on it. A family outside this package
registers with ``register_family(spec)``.
"""

from __future__ import annotations

from typing import Any

from sidscale.errors import ConfigError
from sidscale.families import flux, sd3, toy, unet_vp
from sidscale.families.base import FamilySpec, ModelFamily, install_family_lookup, resolve

# one line per family (each spec is plain data: reading it imports no diffusers)
SPECS: dict[str, FamilySpec] = {
    "unet_vp": unet_vp.SPEC,
    "sd3": sd3.SPEC,
    "toy": toy.SPEC,
    "flux": flux.SPEC,
}
# The order in which error messages list teacher.kind (the kinds of later families follow).
_LISTED_KINDS = ("toy", "sd", "sdxl", "sd3", "toy_flow", "flux")


def _teacher_kinds() -> tuple[str, ...]:
    kinds = [k for spec in SPECS.values() for k in spec.kinds]
    return tuple(sorted(kinds, key=lambda k: (_LISTED_KINDS.index(k) if k in _LISTED_KINDS else len(_LISTED_KINDS),
                                               kinds.index(k))))


TEACHER_KINDS: tuple[str, ...] = _teacher_kinds()


def register_family(spec: FamilySpec) -> None:
    """Add an out-of-tree family (call before the config is read: ``TEACHER_KINDS`` grows with it)."""
    global TEACHER_KINDS
    taken = {k for s in SPECS.values() for k in s.kinds}
    if spec.name in SPECS or taken & set(spec.kinds):
        raise ValueError(f"family {spec.name!r} (kinds {', '.join(spec.kinds)}): the name or a kind is taken")
    SPECS[spec.name] = spec
    TEACHER_KINDS = _teacher_kinds()


def spec_for_kind(kind: str) -> FamilySpec:
    for spec in SPECS.values():
        if kind in spec.adapters:
            return spec
    raise KeyError(f"teacher.kind {kind!r}: expected one of {', '.join(TEACHER_KINDS)}")


def family_for_kind(kind: str) -> ModelFamily:
    """The adapter of ``teacher.kind``."""
    return spec_for_kind(kind).adapter(kind)


install_family_lookup(family_for_kind)  # Teacher.family (base.py cannot import this module)


def spec_for_preset(preset: str) -> FamilySpec:
    """The family whose architectures include bench / plan preset ``preset``."""
    for spec in SPECS.values():
        if preset in spec.presets:
            return spec
    raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(all_presets())}")


def all_presets() -> tuple[str, ...]:
    return tuple(p for spec in SPECS.values() for p in spec.presets)


def validate_family_config(cfg: Any) -> None:
    """The family rules of ``cfg`` (duck-typed): the teacher's family's own checks, and every section
    only another family reads left at its defaults (a changed value would be silently ignored)."""
    kind = cfg.teacher.kind
    spec = spec_for_kind(kind)
    for other in SPECS.values():
        for name, section in other.sections.items():
            if section.check is not None:
                resolve(section.check)(getattr(cfg, name))
            if name in spec.sections:
                continue
            values = {k: getattr(getattr(cfg, name), k) for k in section.defaults}
            if values != dict(section.defaults):
                owners = ", ".join(k for s in SPECS.values() if name in s.sections for k in s.kinds)
                raise ConfigError(f"{name} = {values!r}: expected the defaults for teacher.kind {kind!r} "
                                  f"(only kinds {owners} {section.unused_hint})")
    spec.check_config(cfg)
