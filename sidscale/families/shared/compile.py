"""torch.compile of the UNets the trainer calls (the ``train.compile`` switch)."""

from __future__ import annotations

import torch


def compile_unets(unets: list[torch.nn.Module], backend: str = "inductor") -> None:
    """Compile each module's ``__call__`` in place.

    NOTE: ``nn.Module.compile`` (not ``torch.compile(module)``) keeps the module object and its
    ``state_dict`` keys: DeepSpeed engines, checkpoints, the EMA and exports see the same module.
    ``dynamic=False``: each UNet is called at a few fixed batch sizes (B for the generator, 2B
    for the CFG calls), so each gets its own static graph instead of a slower symbolic one.
    """
    for unet in unets:
        unet.compile(backend=backend, dynamic=False)
