"""FLUX's config rules: the ``distilled_guidance`` section (only a guidance-distilled teacher reads it)
and the text-side limits of FluxPipeline. Duck-typed on the config object (families never import
the config module); the messages are the config checks' own."""

from __future__ import annotations

import dataclasses
from typing import Any

from sidscale.errors import ConfigError

# distilled_guidance.mode: official = SiD-DiT's FLUX coupling (embedding = each call's CFG scale),
# per_role = one fixed embedding per net (sidscale/families/flux/adapter.py)
GUIDANCE_MODES = ("official", "per_role")
# The section's defaults, in its field order (FLUX.1-dev's 3.5; null fake = the teacher's; generator 1.0)
DISTILLED_GUIDANCE_DEFAULTS: dict[str, Any] = {"mode": "per_role", "teacher": 3.5, "fake": None, "generator": 1.0}
UNUSED_HINT = "have a guidance embedding; use method.cfg_* for classifier-free guidance"
MAX_SEQUENCE_LENGTH_LIMIT = 512  # FluxPipeline.check_inputs rejects more (T5's trained length)


def _check(ok: bool, path: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{path} = {value!r}: expected {expected}")


def check_distilled_guidance(g: Any) -> None:
    """The section's own rules, under every teacher.kind."""
    _check(g.mode in GUIDANCE_MODES, "distilled_guidance.mode", g.mode, f"one of {', '.join(GUIDANCE_MODES)}")
    for name in ("teacher", "generator"):
        _check(getattr(g, name) >= 0, f"distilled_guidance.{name}", getattr(g, name), "a value >= 0")
    # NOTE: in mode official the teacher / fake embeddings are each call's cfg_* scale: a value set here
    # would be silently ignored
    teacher_default = DISTILLED_GUIDANCE_DEFAULTS["teacher"]
    _check(g.mode != "official" or (g.teacher == teacher_default and g.fake is None),
           "distilled_guidance", dataclasses.asdict(g) if dataclasses.is_dataclass(g) else dict(vars(g)),
           f"teacher = {teacher_default} and fake = null in mode official (teacher and fake "
           "take each call's method.cfg_* scale as their embedding); set mode per_role for fixed embeddings")
    _check(g.fake is None or g.fake >= 0, "distilled_guidance.fake", g.fake,
           "a value >= 0, or null (the teacher's scale)")


def validate(cfg: Any) -> None:
    """teacher.kind flux: T5 on (its states are FLUX's text sequence), at most 512 T5 tokens."""
    t = cfg.teacher
    _check(t.t5, "teacher.t5", t.t5, "true for teacher.kind flux (T5 is FLUX's text sequence)")
    _check(t.max_sequence_length <= MAX_SEQUENCE_LENGTH_LIMIT, "teacher.max_sequence_length",
           t.max_sequence_length, f"at most {MAX_SEQUENCE_LENGTH_LIMIT} T5 tokens for teacher.kind flux "
           "(FluxPipeline's limit)")
