"""The MMDiT / rectified-flow family: Stable Diffusion 3 and 3.5 (Medium, Large)."""

from sidscale.families.base import FamilySpec
from sidscale.families.sd3.presets import SD3_PRESETS

SPEC = FamilySpec(
    name="sd3",
    adapters={"sd3": "sidscale.families.sd3.adapter:FAMILY"},
    tiny="sidscale.families.sd3.tiny:write_tiny_sd3_teacher",
    tiny_kind="sd3",
    tiny_overrides=("teacher.kind=sd3", "teacher.resolution=64", "teacher.max_sequence_length=16"),
    presets=SD3_PRESETS,
    bench_nets="sidscale.families.sd3.presets:SD3_NETS",
)
