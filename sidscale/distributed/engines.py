"""The two DeepSpeed engines (generator, fake score) and the frozen replicated teacher.

One ``deepspeed.initialize`` per trainable net, each with its own Adam (DeepSpeed-Chat
pattern; DeepSpeedCPUAdam under ZeRO-Offload). Both nets start as exact copies of the teacher UNet.
"""

from __future__ import annotations

import copy
import hashlib
import logging

import torch

from sidscale.config import NetConfig
from sidscale.core.precision import adam_eps, grad_clip_value
from sidscale.distributed import comm


def ds_precision(ds_config: dict) -> str:
    """``train.precision`` as written into the effective ds_config by ``build_ds_config``."""
    for key in ("fp16", "bf16"):
        block = ds_config.get(key) or {}
        if block.get("enabled"):
            return "pure_bf16" if key == "bf16" and block.get("bf16_master_weights_and_grads") else key
    return "fp32"


def offloads_optimizer(ds_config: dict) -> bool:
    """True when ZeRO-Offload keeps the optimizer on the host (offload_optimizer device cpu or nvme)."""
    offload = (ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return str(offload.get("device", "none")).lower() in ("cpu", "nvme")


def build_optimizer(params, net_cfg: NetConfig, ds_config: dict) -> torch.optim.Optimizer:
    """Adam for one net. With ZeRO-Offload: DeepSpeed's vectorised CPU Adam, else torch Adam.

    NOTE: ZeRO-Offload refuses a plain torch Adam unless the ds_config says
    ``"zero_force_ds_cpu_optimizer": false``, and ``ds_configs/zero3_offload.json`` says so: with
    SiD-LSG's global batch of 512, an offloaded run (SDXL on one or few GPUs) accumulates tens to
    hundreds of micro-batches, each several UNet forwards and backwards, per optimizer step, so the
    host-side Adam step (seconds with torch's multi-threaded foreach Adam) is a small share of the
    iteration; and torch Adam needs no C++ JIT build (~1-2.5 min at first use, a compiler on every
    node). A ds_config without that key gets DeepSpeedCPUAdam (AVX, OpenMP: several times faster on
    the host), for small global batches where the optimizer step does matter.
    ``adamw_mode=False``: the same (L2, not decoupled) weight decay as torch.optim.Adam.
    """
    betas = (float(net_cfg.betas[0]), float(net_cfg.betas[1]))
    eps = adam_eps(net_cfg, ds_precision(ds_config))
    if offloads_optimizer(ds_config) and ds_config.get("zero_force_ds_cpu_optimizer", True):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=net_cfg.lr, betas=betas, eps=eps, weight_decay=net_cfg.weight_decay,
                                adamw_mode=False)
    return torch.optim.Adam(params, lr=net_cfg.lr, betas=betas, eps=eps, weight_decay=net_cfg.weight_decay)


def clip_grad_values_before_step(optimizer: torch.optim.Optimizer, clip_value: float) -> object:
    """Clamp every gradient entry to [-clip_value, clip_value] right before each ``optimizer.step()``
    (the method's fp16 rule). Returns the hook handle.

    NOTE: where this must run. A parameter hook (like the NaN sanitisers) would see each
    micro-batch's gradient before accumulation and before the data-parallel reduction, and under fp16
    still multiplied by the loss scale, so clamping there is not clamping the gradient Adam uses.
    DeepSpeed's ZeRO-1/2 (``stage_1_and_2.py: step``) and ZeRO-3 (``stage3.py: step``), with or without
    offload, first check the accumulated, reduced fp32 partition gradient for overflow (and skip the
    step, so an inf is never clamped into a finite update), then divide it by the loss scale
    (``unscale_and_clip_grads``) and only then call the wrapped ``optimizer.step()`` on the fp32
    master partition, whose ``.grad`` is that unscaled gradient. A step pre-hook of the optimizer
    DeepSpeed wraps therefore clips exactly the unscaled, accumulated, reduced gradient, which is what
    the reference's ``clip_grad_value_`` before ``optimizer.step()`` clips. Element-wise clipping
    needs no communication, so each rank clipping its own partition is exact. torch runs step
    pre-hooks for every ``torch.optim.Optimizer`` subclass, DeepSpeedCPUAdam included.
    """

    def hook(opt: torch.optim.Optimizer, _args, _kwargs) -> None:
        with torch.no_grad():
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.clamp_(-clip_value, clip_value)

    return optimizer.register_step_pre_hook(hook)


CONSTRUCTIONS = ("auto", "copy", "zero_init")


def build_engine(teacher_unet: torch.nn.Module, net_cfg: NetConfig, ds_config: dict, construct: str = "auto"):
    """A trainable copy of the teacher wrapped in a DeepSpeed engine (DeepSpeed casts it to
    bf16/fp16 per ds_config and keeps fp32 master weights in the optimizer; bf16 ones under pure_bf16).
    The optimizer follows the precision's rules: Adam eps and gradient value clipping (``sidscale.core.precision``).

    ``construct``: ``copy`` = an fp32 deep copy of the teacher on every rank, then DeepSpeed
    partitions it (ZeRO-1/2 keep the module whole anyway); ``zero_init`` = built under
    ``deepspeed.zero.Init`` and loaded slice by slice, so no rank holds a full copy (ZeRO-3 only;
    ``sidscale.distributed.zero_init``); ``auto`` = ``zero_init`` under ZeRO-3 for a diffusers network
    (it is rebuilt from its config), else ``copy``.
    Both give the same weights bit for bit."""
    import deepspeed

    if construct not in CONSTRUCTIONS:
        raise ValueError(f"construct = {construct!r}: expected one of {CONSTRUCTIONS}")
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    if construct == "auto":
        # zero.Init rebuilds the network from its diffusers config; a plain torch module (the tests' probes)
        # has none, and is small: it is copied
        buildable = hasattr(teacher_unet, "from_config") and hasattr(teacher_unet, "config")
        construct = "zero_init" if stage == 3 and buildable else "copy"
    if construct == "zero_init":
        if stage != 3:
            raise ValueError(f"construct = 'zero_init' needs zero_optimization.stage 3, the ds_config has {stage}")
        from sidscale.distributed.zero_init import partitioned_copy

        model = partitioned_copy(teacher_unet, ds_config)
    else:
        model = copy.deepcopy(teacher_unet).float().requires_grad_(True).train()
    if net_cfg.grad_checkpointing:
        model.enable_gradient_checkpointing()
    optimizer = build_optimizer(model.parameters(), net_cfg, ds_config)
    clip = grad_clip_value(net_cfg, ds_precision(ds_config))
    if clip is not None:
        clip_grad_values_before_step(optimizer, clip)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=copy.deepcopy(ds_config))
    return engine


_DIGEST_CHUNK = 1 << 24  # 32-bit words per step: bounds the int64 temporaries at 128 MiB each
_MULT_A, _MULT_B = 0x9E3779B97F4A7C15 - (1 << 64), 0x632BE59BD9B4E019  # odd 64-bit constants (as int64)


def tensor_digest(t: torch.Tensor) -> torch.Tensor:
    """Three int64 checksums of ``t``'s bytes, computed where ``t`` lives (no copy to the host).

    The bytes are read as 32-bit words w_i and summed exactly in 64-bit wrap-around arithmetic:
    sum(w_i), sum(w_i m_i) and sum((w_i xor i) m'_i) with odd multipliers m_i = (i A + B) | 1 and
    m'_i from i's bits. Integer sums are exact, so every rank and every chunking gets the same digest.
    A change of any single word changes the second sum (d m_i != 0 mod 2^64 for 0 < |d| < 2^33, m_i
    odd), and so does an exchange of two words ((a - b)(m_i - m_j) = (a - b)(i - j) A, nonzero mod 2^64)."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    pad = (-raw.numel()) % 4
    if pad:
        raw = torch.cat([raw, raw.new_zeros(pad)])
    words = raw.view(torch.int32)
    acc = torch.zeros(3, dtype=torch.int64, device=t.device)
    for lo in range(0, words.numel(), _DIGEST_CHUNK):
        w = words[lo:lo + _DIGEST_CHUNK].to(torch.int64)
        idx = torch.arange(lo, lo + w.numel(), dtype=torch.int64, device=t.device)
        m = (idx * _MULT_A + _MULT_B) | 1
        m2 = ((idx ^ (idx >> 7)) * _MULT_B) | 1
        acc += torch.stack([w.sum(), (w * m).sum(), ((w ^ idx) * m2).sum()])
    return acc


def module_fingerprint(module: torch.nn.Module, reduce_on_device: bool | None = None) -> str:
    """A hash of every parameter and buffer (names, dtypes, shapes and bytes).

    NOTE: tensors on an accelerator are reduced where they live (``tensor_digest``); only three numbers
    per tensor reach the host, in one copy per device. Copying a FLUX teacher with its T5 (~67 GB as
    fp32) to the host to hash it took minutes per start. Host tensors (text encoders kept on the CPU)
    are hashed as they are, without a float copy. ``reduce_on_device``: force one way (tests)."""
    named = list(module.named_parameters()) + list(module.named_buffers())
    h = hashlib.sha256()
    digests: dict[str, list[torch.Tensor]] = {}
    for name, t in named:
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        on_device = t.device.type != "cpu" if reduce_on_device is None else reduce_on_device
        if on_device:
            digests.setdefault(t.device.type, []).append(tensor_digest(t))  # never the index: ranks differ
        else:
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for kind in sorted(digests):
        h.update(f"{kind}:{torch.stack(digests[kind]).cpu().tolist()}".encode())
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


def apply_configured_lr(engine, lr: float, key: str, report: bool = True) -> list[float]:
    """Give ``engine``'s optimizer the configured learning rate after ``load_checkpoint``, which restores
    the param groups (their lr included) from the checkpoint: a run resumed with another ``key`` (e.g.
    ``generator.lr``) trains with the new value that config.yaml and meta.json record. Returns the
    checkpoint's value(s); ``report``: say so when they differ (rank 0)."""
    groups = engine.optimizer.param_groups
    saved = sorted({float(g["lr"]) for g in groups})
    for g in groups:
        g["lr"] = float(lr)
    if report and saved != [float(lr)]:
        logging.getLogger(__name__).warning("%s: the checkpoint's optimizer had lr %s, this job sets %g: applied "
                                            "from the resumed step on", key, saved, lr)
    return saved
