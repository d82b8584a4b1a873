"""The UNet / discrete-VP family: SD1.5, SD2.1 (eps or v), SDXL (the toy VP teacher uses its adapter too)."""

from sidscale.families.base import FamilySpec
from sidscale.families.unet_vp.presets import UNET_PRESETS

SPEC = FamilySpec(
    name="unet_vp",
    adapters={"sd": "sidscale.families.unet_vp.adapter:FAMILY", "sdxl": "sidscale.families.unet_vp.adapter:FAMILY"},
    tiny="sidscale.families.unet_vp.tiny:write_tiny_sd_teacher",
    tiny_kind="sd",
    tiny_overrides=("teacher.kind=sd", "teacher.resolution=64"),
    presets=UNET_PRESETS,
    bench_nets="sidscale.families.unet_vp.presets:UNET_NETS",
)
