"""The two DeepSpeed engines (generator, fake score) and the frozen replicated teacher.

One ``deepspeed.initialize`` per trainable net, each with its own torch Adam (DeepSpeed-Chat
pattern). Both nets start as exact copies of the teacher UNet.
"""

from __future__ import annotations

import copy
import hashlib

import torch

from sidscale.config import NetConfig
from sidscale.distributed import comm


def build_engine(teacher_unet: torch.nn.Module, net_cfg: NetConfig, ds_config: dict):
    """A trainable fp32 copy of the teacher wrapped in a DeepSpeed engine (DeepSpeed casts it to
    bf16/fp16 per ds_config and keeps fp32 master weights in the optimizer)."""
    import deepspeed

    model = copy.deepcopy(teacher_unet).float().requires_grad_(True).train()
    if net_cfg.grad_checkpointing:
        model.enable_gradient_checkpointing()
    optimizer = torch.optim.Adam(
        model.parameters(), lr=net_cfg.lr, betas=(float(net_cfg.betas[0]), float(net_cfg.betas[1])),
        eps=net_cfg.eps, weight_decay=net_cfg.weight_decay,
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=copy.deepcopy(ds_config))
    return engine


def module_fingerprint(module: torch.nn.Module) -> str:
    """A hash of every parameter and buffer, byte for byte."""
    h = hashlib.sha256()
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        h.update(name.encode())
        h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def check_identical_across_ranks(modules: dict[str, torch.nn.Module]) -> None:
    """Fail clearly if any rank loaded different weights (a different file, a different seed)."""
    mine = {name: module_fingerprint(m) for name, m in modules.items()}
    gathered = comm.all_gather_object(mine)
    for name in mine:
        ranks = {r: g[name] for r, g in enumerate(gathered)}
        if len(set(ranks.values())) != 1:
            detail = ", ".join(f"rank {r}: {v[:12]}" for r, v in ranks.items())
            raise RuntimeError(f"the {name} weights differ between ranks ({detail}); every rank must load the same "
                               "teacher files")
