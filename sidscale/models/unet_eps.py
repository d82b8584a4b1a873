"""A diffusers UNet as an eps-function ``(x_t, t, cond) -> eps`` in fp32."""

from __future__ import annotations

import torch

from sidscale.core.schedule import VPSchedule
from sidscale.models.conditioning import Cond, unet_kwargs


class UNetEps(torch.nn.Module):
    """Wraps a UNet (or a DeepSpeed engine / its ``.module``) so the method sees eps only.

    Inputs are cast to the network's parameter dtype (bf16/fp16 teachers hold low-precision
    weights without autocast); the output comes back as fp32 eps, converted from v when the
    teacher predicts v.
    """

    def __init__(self, net: torch.nn.Module, schedule: VPSchedule, dtype: torch.dtype | None = None):
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.dtype = dtype

    def _dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        return next(self.net.parameters()).dtype

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        dtype = self._dtype()
        kwargs = unet_kwargs({k: v.to(dtype) for k, v in cond.items()})
        out = self.net(x_t.to(dtype), t, **kwargs, return_dict=False)[0]
        return self.schedule.model_output_to_eps(x_t.float(), out.float(), t)
