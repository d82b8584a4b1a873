"""The discriminator of the data-aided adversarial method: the fake score network's own features,
pooled to logits (docs/adversarial.md 2). No parameter is added: reading a feature map is a forward hook.

Where each architecture is read (the authors' choice, in their released code):
- UNet (``UNet2DConditionModel``): the output of the last down block, before the mid block, averaged
  over channels: one logit per position of the lowest-resolution map ([B, h*w]);
- MMDiT (SD3 / FLUX transformers): the output of the final adaptive norm ``norm_out`` (before
  ``proj_out``), averaged over the image tokens: one logit per channel ([B, D]). FLUX has already
  dropped its text tokens there, and SD3's image stream is separate, so the mean is over image tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


def _unwrap(net: torch.nn.Module) -> torch.nn.Module:
    return getattr(net, "module", net)  # a DeepSpeed engine runs its .module's forward


def channel_mean(output: object) -> torch.Tensor:
    """A down block returns ``(hidden_states, residuals)``: the channel mean of the hidden states, flattened."""
    h = output[0] if isinstance(output, tuple) else output
    return h.float().mean(dim=1).flatten(1)


def token_mean(output: object) -> torch.Tensor:
    """``norm_out``'s output [B, tokens, D]: the mean over the tokens, one logit per channel."""
    h = output[0] if isinstance(output, tuple) else output
    return h.float().mean(dim=1)


class FeatureTap:
    """Captures ``pool(module output)`` of every call of ``module`` made inside ``capture()``.

    The hook exists only inside the block: a recomputation under activation checkpointing (in the
    backward, after the block) is not captured twice, and a network outside the block pays nothing."""

    def __init__(self, module: torch.nn.Module, pool: Callable[[object], torch.Tensor]) -> None:
        self.module, self.pool = module, pool

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[torch.Tensor]]:
        captured: list[torch.Tensor] = []
        handle = self.module.register_forward_hook(lambda _m, _inp, out: captured.append(self.pool(out)))
        try:
            yield captured
        finally:
            handle.remove()

    def logits(self, fn: Callable[[], torch.Tensor], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``fn`` (one network call, possibly a CFG batch [uncond; cond] of 2B, or a step that makes one)
        and return its result and the logits of its LAST ``batch`` samples (the conditional half of a CFG
        batch)."""
        with self.capture() as captured:
            out = fn()
        if len(captured) != 1:
            raise RuntimeError(f"the discriminator read-out ran {len(captured)} times in one network call; "
                               "expected once (docs/adversarial.md 2)")
        return out, captured[0][-batch:]


def unet_readout(net: torch.nn.Module) -> FeatureTap:
    return FeatureTap(_unwrap(net).down_blocks[-1], channel_mean)


def transformer_readout(net: torch.nn.Module) -> FeatureTap:
    return FeatureTap(_unwrap(net).norm_out, token_mean)
