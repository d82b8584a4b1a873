"""Images -> the latents a teacher denoises, with its VAE (the real pairs of the adversarial method).

Every family's latent is ``(VAE.encode(img).latent_dist.sample() - shift_factor) * scaling_factor``: SD1.5,
SD2 and SDXL have no shift (0), SD3 and FLUX shift and scale as their pipelines do. FLUX's latents are
kept unpacked [16, H/8, W/8] in sidscale (``Teacher.latent_shape``; its network call packs them 2x2), so
the same function serves it. The toy teachers have no VAE: their latent is the image.
"""

from __future__ import annotations

import torch


def encode_images(vae: torch.nn.Module | None, pixels: torch.Tensor, generator: torch.Generator | None,
                  scaling_factor: float, shift_factor: float = 0.0) -> torch.Tensor:
    """``pixels`` [B, 3, H, W] in [-1, 1] -> fp32 latents ``(latent_dist.sample(generator) - shift) * scaling``
    on ``pixels``' device; ``vae`` None: the pixels themselves (fp32). An fp16 VAE whose config asks for it
    (``force_upcast``, as diffusers' pipelines do before encoding) encodes in fp32."""
    if vae is None:
        return pixels.float()
    dtype = next(vae.parameters()).dtype
    upcast = dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    with torch.no_grad():
        if upcast:
            vae.to(torch.float32)
        try:
            dist = vae.encode(pixels.to(torch.float32 if upcast else dtype)).latent_dist
            z = dist.sample(generator=generator).float()
        finally:
            if upcast:
                vae.to(dtype)
    return (z - shift_factor) * scaling_factor
