"""Text encoders kept in host memory (``teacher.text_encoders: cpu``).

T5-XXL is 9 GB in bf16 on every GPU of an SD3 / FLUX run; with ``cpu`` the encoders run on the host
(as many threads as the rank's cores) and only their outputs, a few MB per micro-batch, go to the GPU.
What it costs: the encodes of an iteration (2 phases x the accumulation rounds) run on the CPU, in the
critical path, with the GPU idle meanwhile: T5-XXL is ~2 x 4.7 G multiply-adds per token, so about
0.7 TFLOP per prompt at SD3's 77 tokens and 4.8 TFLOP at FLUX's 512 (FLUX.1-dev at micro-batch 1 on
8 GPUs: 64 encodes per rank per iteration, likely minutes on a host). Use it where memory, not time,
is what stops the run. What it saves: the encoders' weights on the device (the memory plan's ``text_encoders="off"``).
The outputs equal the GPU encoders' up to the CPU's own rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _to(cond: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in cond.items()}


class HostConditioner(torch.nn.Module):
    """A conditioner (``families.base.Conditioner``) whose encoders live on the CPU and whose outputs are
    moved to ``device``. The unconditional branch is encoded once per batch size and kept on ``device``."""

    def __init__(self, inner: torch.nn.Module, device: torch.device | str):
        super().__init__()
        self.inner = inner.to("cpu")
        self.device = torch.device(device)
        self.tokenize = inner.tokenize
        self._empty: dict[int, dict] = {}

    def encode_ids(self, input_ids: torch.Tensor) -> dict:
        return _to(self.inner.encode_ids(input_ids.to("cpu")), self.device)

    def encode(self, prompts: Sequence[str]) -> dict:
        return _to(self.inner.encode(prompts), self.device)

    def empty(self, batch: int) -> dict:
        if batch not in self._empty:
            self._empty[batch] = _to(self.inner.empty(batch), self.device)
        return self._empty[batch]
