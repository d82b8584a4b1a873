"""The FLUX.1 family (FLUX.1-dev: a guidance-distilled rectified-flow transformer)."""

from sidscale.families.base import ConfigSection, FamilySpec
from sidscale.families.flux.config import DISTILLED_GUIDANCE_DEFAULTS, UNUSED_HINT
from sidscale.families.flux.presets import FLUX_PRESET_NAMES

SPEC = FamilySpec(
    name="flux",
    adapters={"flux": "sidscale.families.flux.adapter:FAMILY"},
    tiny="sidscale.families.flux.tiny:write_tiny_flux_teacher",
    tiny_kind="flux",
    tiny_overrides=("teacher.kind=flux", "teacher.resolution=64", "teacher.max_sequence_length=16"),
    presets=FLUX_PRESET_NAMES,
    bench_nets="sidscale.families.flux.presets:FLUX_NETS",
    validate="sidscale.families.flux.config:validate",
    sections={"distilled_guidance": ConfigSection(DISTILLED_GUIDANCE_DEFAULTS, UNUSED_HINT,
                                                  check="sidscale.families.flux.config:check_distilled_guidance")},
)
