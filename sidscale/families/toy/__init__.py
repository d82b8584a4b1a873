"""The built-in toy teachers (a Gaussian mixture of coloured shapes, ground truth known): the VP toy
(kind ``toy``, served by the unet_vp adapter) and the rectified-flow toy (kind ``toy_flow``)."""

from sidscale.families.base import FamilySpec

SPEC = FamilySpec(
    name="toy",
    adapters={"toy": "sidscale.families.unet_vp.adapter:FAMILY", "toy_flow": "sidscale.families.toy.adapter:FAMILY"},
    tiny="sidscale.families.toy.tiny:write_tiny_toy_teacher",
    tiny_kind="toy",
    tiny_overrides=("teacher.kind=toy", "teacher.resolution=8"),
    end_of_run="sidscale.families.toy.evaluation:end_of_run",
)
