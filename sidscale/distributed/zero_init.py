"""Trainable copies of the teacher built straight into ZeRO-3 partitions (``deepspeed.zero.Init``).

The copy build (``copy.deepcopy(teacher).float()``, then ``deepspeed.initialize``) holds a full fp32
copy of the network on every rank before DeepSpeed partitions it: for FLUX.1-dev that is 47.6 GB per
rank and per trainable net, ~950 GB of host memory on an 8-GPU node (docs/flow_matching.md 5.4). Here
the network is constructed under ``deepspeed.zero.Init``, which partitions each sub-module's
parameters as soon as that sub-module's ``__init__`` returns, so a rank never holds more than its
1/N share plus the one layer being constructed; then each rank copies ITS slice of every
teacher parameter into its partition (no communication: every rank already holds the frozen
teacher). The result equals the copy build bit for bit (tests/trainer/test_teacher_partition.py):

- parameters: ``teacher -> fp32 -> the training dtype``, the same two casts as the copy build's
  ``.float()`` and DeepSpeed's own cast of the fp32 copy to bf16/fp16;
- buffers (not partitioned by ZeRO-3): the teacher's, in fp32, as ``.float()`` leaves them (DeepSpeed
  0.19 casts parameters only);
- attention processors and gradient checkpointing: the teacher's (a fresh construction would get the
  library's defaults);
- the global RNG: untouched (the throw-away random initialisation runs in a forked RNG).
"""

from __future__ import annotations

import copy

import torch


def _constructor(net: torch.nn.Module):
    """``type(net).from_config`` of a diffusers model (every family's network is one)."""
    cls = type(net)
    if not hasattr(cls, "from_config") or not hasattr(net, "config"):
        raise TypeError(f"cannot build a {cls.__name__} under deepspeed.zero.Init: it is not a diffusers model "
                        "(no from_config / config); use a ZeRO-1/2 deepspeed.config, which copies the teacher")
    return lambda: cls.from_config(copy.deepcopy(dict(net.config)))


def copy_attention_processors(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Give ``dst`` fresh instances of ``src``'s attention processors (diffusers models only)."""
    if hasattr(src, "attn_processors") and hasattr(dst, "set_attn_processor"):
        dst.set_attn_processor({name: copy.deepcopy(p) for name, p in src.attn_processors.items()})


@torch.no_grad()
def load_partitions_from(module: torch.nn.Module, source: torch.nn.Module) -> None:
    """Copy every parameter of the full ``source`` into this rank's ZeRO-3 partition of ``module``.

    Each rank writes elements ``[r * part, r * part + part)`` of the flattened parameter (ZeRO-3's
    layout: ``partition_parameters._partition_param``), the last rank's tail padding left as it is.
    A parameter that is currently gathered (or persistent) also gets its full ``.data``.
    """
    from deepspeed import comm as dist

    src = dict(source.named_parameters())
    names = [n for n, _ in module.named_parameters()]
    if set(names) != set(src):
        missing, extra = sorted(set(src) - set(names)), sorted(set(names) - set(src))
        raise ValueError(f"the partitioned network does not match the teacher: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    for name, p in module.named_parameters():
        full = src[name].detach()
        if not hasattr(p, "ds_tensor"):
            raise ValueError(f"{name} is not a ZeRO-3 parameter (built outside deepspeed.zero.Init?)")
        if tuple(p.ds_shape) != tuple(full.shape):
            raise ValueError(f"{name}: partitioned shape {tuple(p.ds_shape)} != teacher {tuple(full.shape)}")
        part = p.ds_tensor.ds_numel
        start = part * dist.get_rank(group=p.ds_process_group)
        n = max(0, min(part, p.ds_numel - start))
        if n:
            # only this rank's slice moves (to the partition's device: the GPU, or the host with
            # offload_param); teacher dtype -> fp32 -> training dtype, the copy build's two casts
            piece = full.reshape(-1).narrow(0, start, n).to(device=p.ds_tensor.device, dtype=torch.float32)
            p.ds_tensor.narrow(0, 0, n).copy_(piece.to(p.ds_tensor.dtype))
        if p.data.numel() == p.ds_numel:  # gathered right now: keep the full view consistent
            p.data.copy_(full.to(device=p.data.device, dtype=torch.float32).to(p.data.dtype))


def partitioned_copy(teacher_net: torch.nn.Module, ds_config: dict) -> torch.nn.Module:
    """A trainable copy of ``teacher_net`` whose parameters exist only as ZeRO-3 partitions.

    Built under ``deepspeed.zero.Init`` with ``ds_config`` (its precision decides the parameter
    dtype, its ``offload_param`` where the partitions live), loaded from the teacher slice by slice.
    """
    import deepspeed

    build = _constructor(teacher_net)
    device = next(teacher_net.parameters()).device
    # NOTE: the constructor's random initialisation is overwritten; fork the RNG so that building
    # this way leaves the global generator where the copy build leaves it.
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), deepspeed.zero.Init(config_dict_or_path=copy.deepcopy(ds_config)):
        model = build()
    load_partitions_from(model, teacher_net)
    teacher_buffers = dict(teacher_net.named_buffers())
    for name, buf in model.named_buffers():
        want = teacher_buffers[name].detach()
        want = want.float() if want.is_floating_point() else want
        buf.data = want.clone()  # where the copy build keeps them: on the teacher's device
    copy_attention_processors(teacher_net, model)
    if getattr(teacher_net, "is_gradient_checkpointing", False):  # a deep copy would carry it over too
        model.enable_gradient_checkpointing()
    return model.requires_grad_(True).train()
