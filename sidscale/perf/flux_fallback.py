"""FALLBACK ONLY: FLUX.1-dev for the scaling model and the memory plan until ``flux_dev`` is in ``preset_nets``.

Another change adds the FLUX family and its ``flux_dev`` preset to ``sidscale.perf.setup.preset_nets``; once it
is merged, ``preset_nets("flux_dev")`` answers and nothing here is used (``flux_nets_available`` is then true and
the tools never install this). Until then the tables need FLUX numbers, so this module builds the published
FLUX.1-dev transformer (``FluxTransformer2DModel`` with the released ``transformer/config.json`` values) on the
meta device, with SiD-DiT's 512 T5 tokens, checked against the method page's parameter count (11.901 B,
docs/sid_dit_method.md table 5.1). FLUX runs on its guidance embedding without true CFG (cfg scales 1.0).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

FLUX_DEV_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56),
}
FLUX_DOC_PARAMS = 11.901e9  # docs/sid_dit_method.md table 5.1
FLUX_T5_TOKENS = 512
FLUX_RESOLUTION = 1024
# The SiD-DiT FLUX recipe as the SD3.5-Large config has it, minus true CFG (the guidance embedding).
FLUX_TRAIN = {"global_batch": 256, "micro_batch": 1, "generator_steps": 4, "cfg_scales": (1.0, 1.0, 1.0),
              "grad_checkpointing": True}


def flux_nets_available() -> bool:
    """True when the real ``flux_dev`` preset is merged (then this fallback must not be used)."""
    from sidscale.perf.setup import preset_nets

    try:
        preset_nets("flux_dev")
    except ValueError:
        return False
    return True


class FluxFallbackNets:
    """The subset of ``PresetNets`` the memory plan and the scaling model call, for ``flux_dev`` only."""

    name = "flux_fallback"

    def build(self, preset: str, device: torch.device | str, seed: int) -> torch.nn.Module:
        from diffusers import FluxTransformer2DModel

        with torch.device(device):
            return FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)

    def text_encoders(self, preset: str, device: torch.device | str, seed: int) -> list[torch.nn.Module]:
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        from sidscale.models.presets import CLIP_L_TEXT
        from sidscale.models.sd3_presets import T5_XXL_ENCODER

        with torch.device(device):
            return [CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)), T5EncoderModel(T5Config(**T5_XXL_ENCODER))]

    def latent_shape(self, preset: str) -> tuple[int, int, int]:
        return (16, FLUX_RESOLUTION // 8, FLUX_RESOLUTION // 8)

    def inputs(self, preset: str, net: torch.nn.Module, batch: int, device: Any,
               dtype: torch.dtype) -> tuple[tuple, dict[str, Any]]:
        tokens = (FLUX_RESOLUTION // 16) ** 2  # 2x2-packed 128x128 latents: 4096 tokens of 64 channels
        c = net.config
        x = torch.zeros(batch, tokens, c.in_channels, device=device, dtype=dtype, requires_grad=True)
        return (), {
            "hidden_states": x,
            "encoder_hidden_states": torch.zeros(batch, FLUX_T5_TOKENS, c.joint_attention_dim, device=device,
                                                 dtype=dtype),
            "pooled_projections": torch.zeros(batch, c.pooled_projection_dim, device=device, dtype=dtype),
            "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
            "img_ids": torch.zeros(tokens, 3, device=device, dtype=dtype),
            "txt_ids": torch.zeros(FLUX_T5_TOKENS, 3, device=device, dtype=dtype),
            "guidance": torch.full((batch,), 3.5, device=device, dtype=dtype),
        }

    def checkpoint_block_types(self) -> tuple[type, ...]:
        from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

        return (FluxTransformerBlock, FluxSingleTransformerBlock)


@contextlib.contextmanager
def flux_fallback_installed() -> Iterator[None]:
    """Within the block, ``preset_nets("flux_dev")`` answers with ``FluxFallbackNets`` (no-op once merged)."""
    import sidscale.perf.setup as setup

    if flux_nets_available():
        yield
        return
    original = setup.preset_nets
    fallback = FluxFallbackNets()

    def preset_nets(preset: str):
        return fallback if preset == "flux_dev" else original(preset)

    setup.preset_nets = preset_nets
    try:
        yield
    finally:
        setup.preset_nets = original
