"""The config rules that depend on ``teacher.kind`` (``sidscale.config.checks.family_rules``): each rule's
exact message, and that they run after the generic checks. The messages are the contract a family's
own ``validate`` must keep when the rules move into the family specs.
"""

from __future__ import annotations

import pytest

from sidscale.config import ConfigError, load_config
from sidscale.config.checks import family_rules

FLUX = ["teacher.kind=flux", "teacher.path=/models/flux"]


def rule_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config("toy", list(overrides))
    return str(info.value).split(" (from ")[0]


@pytest.mark.parametrize(("overrides", "expected"), [
    (["teacher.kind=sdxl"],
     "teacher.path = '': expected a local diffusers directory (only kinds toy / toy_flow have a built-in "
     "teacher; kind is 'sdxl')"),
    (["teacher.kind=sd3", "teacher.path=/m", "teacher.resolution=1020"],
     "teacher.resolution = 1020: expected a multiple of 8 for kind 'sd3'"),
    (["teacher.kind=sd", "teacher.path=/m", "teacher.resolution=512", "distilled_guidance.teacher=2.0"],
     "distilled_guidance = {'mode': 'per_role', 'teacher': 2.0, 'fake': None, 'generator': 1.0}: expected the "
     "defaults for teacher.kind 'sd' (only kinds flux have a guidance embedding; use method.cfg_* for "
     "classifier-free guidance)"),
    (["distilled_guidance.mode=official"],
     "distilled_guidance = {'mode': 'official', 'teacher': 3.5, 'fake': None, 'generator': 1.0}: expected the "
     "defaults for teacher.kind 'toy' (only kinds flux have a guidance embedding; use method.cfg_* for "
     "classifier-free guidance)"),
    ([*FLUX, "distilled_guidance.mode=both"],
     "distilled_guidance.mode = 'both': expected one of official, per_role"),
    ([*FLUX, "distilled_guidance.generator=-1"], "distilled_guidance.generator = -1.0: expected a value >= 0"),
    ([*FLUX, "distilled_guidance.teacher=-1"], "distilled_guidance.teacher = -1.0: expected a value >= 0"),
    ([*FLUX, "distilled_guidance.fake=-0.5"],
     "distilled_guidance.fake = -0.5: expected a value >= 0, or null (the teacher's scale)"),
    ([*FLUX, "distilled_guidance.mode=official", "distilled_guidance.fake=3.5"],
     "distilled_guidance = {'mode': 'official', 'teacher': 3.5, 'fake': 3.5, 'generator': 1.0}: expected "
     "teacher = 3.5 and fake = null in mode official (teacher and fake take each call's method.cfg_* scale "
     "as their embedding); set mode per_role for fixed embeddings"),
    ([*FLUX, "teacher.t5=false"], "teacher.t5 = False: expected true for teacher.kind flux (T5 is FLUX's text "
                                  "sequence)"),
    ([*FLUX, "teacher.max_sequence_length=513"],
     "teacher.max_sequence_length = 513: expected at most 512 T5 tokens for teacher.kind flux (FluxPipeline's "
     "limit)"),
])
def test_each_family_rule_and_its_message(overrides: list[str], expected: str) -> None:
    assert rule_error(*overrides) == expected


def test_what_the_rules_allow() -> None:
    # toy kinds: no directory, any resolution; other kinds keep the guidance defaults; flux: 512 T5 tokens
    assert load_config("toy", ["teacher.kind=toy_flow", "teacher.resolution=15"]).teacher.resolution == 15
    cfg = load_config("toy", [*FLUX, "teacher.max_sequence_length=512", "distilled_guidance.mode=official"])
    family_rules(cfg)
    cfg = load_config("toy", [*FLUX, "distilled_guidance.teacher=2.0", "distilled_guidance.fake=0"])
    assert (cfg.distilled_guidance.teacher, cfg.distilled_guidance.fake) == (2.0, 0.0)
    assert load_config("toy", ["teacher.kind=sd3", "teacher.path=/m", "teacher.t5=false"]).teacher.t5 is False


def test_family_rules_run_after_the_generic_checks() -> None:
    # a config breaking a generic check and a family rule reports the generic one
    assert rule_error("teacher.kind=sd", "train.max_steps=0") == "train.max_steps = 0: expected a positive value"
    assert rule_error("teacher.kind=sd", "dist.timeout_s=1").startswith("dist.timeout_s = 1: expected seconds >= 10")
