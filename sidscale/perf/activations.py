"""Saved-activation bytes of a denoiser forward (UNet, SD3 transformer), measured with saved-tensor hooks.

``torch.autograd.graph.saved_tensors_hooks`` sees what autograd keeps for the backward.
What autograd saves for the backward is what the activations cost. The hook sees every saved
tensor; we count each underlying storage once (views share one StorageImpl, keyed by ``_cdata``)
and skip parameter storages (weights saved for the input gradient are not activations).

The measurement runs on any device, including ``meta``: meta tensors carry shapes and dtypes but
no data, so a real-size network at its real latent size costs no memory and seconds. NOTE: on meta,
SDPA would pick the math kernel, which saves the [N, N] attention matrix; the CPU/GPU runs use
flash-type kernels that save q, k, v, out and the log-sum-exp only. ``flash_sdpa_on_meta`` routes
meta SDPA through the CPU flash op (it has meta and autograd kernels) so meta matches the real runs.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from sidscale.families.presets import build_preset_net, preset_net_inputs
from sidscale.families.unet_vp.presets import unet_inputs


@contextlib.contextmanager
def flash_sdpa_on_meta() -> Iterator[None]:
    """Within the block, SDPA on meta tensors (no mask, no dropout) saves what flash attention saves."""
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if query.device.type != "meta" or attn_mask is not None or dropout_p or kw:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, **kw)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, is_causal,
                                                                           scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@contextlib.contextmanager
def torch_linear() -> Iterator[None]:
    """Within the block, ``F.linear`` is torch's own. A ZeRO-3 engine built earlier in the process (DeepSpeed's
    memory_efficient_linear, its default) leaves its own wrapper in that place for good, and measured through
    it SD3.5-Large's saved activations came out 12 % larger: plans depended on what the process ran before."""
    current = F.linear
    F.linear = torch._C._nn.linear
    try:
        yield
    finally:
        F.linear = current


def saved_tensor_bytes(fn, params: list[torch.nn.Parameter] | None = None) -> int:
    """Bytes of distinct non-parameter storages autograd saves while running ``fn()``."""
    skip = {p.untyped_storage()._cdata for p in params or []}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st._cdata not in skip:
            seen[st._cdata] = st.nbytes()
        return t

    # NOTE: outputs are kept alive until the hook context ends, so no storage is freed and reused
    # (a reused address would be counted once although both were alive).
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


class LiveBytes(TorchDispatchMode):
    """Within the block: the bytes of the storages the ops create that are still alive (``live``) and their
    largest sum (``peak``). Works on any device, ``meta`` included: a storage is counted when an op first
    returns it (not when it is a view of, or the same as, an input) and uncounted when it is freed
    (a weak reference to the storage, whose Python object lives exactly as long as the storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.live, self.peak = 0, 0
        self._refs: dict[int, weakref.ref] = {}

    def _free(self, key: int, n: int) -> None:
        if self._refs.pop(key, None) is not None:
            self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = st._cdata
            if key in inputs or key in self._refs:
                continue
            n = st.nbytes()
            self._refs[key] = weakref.ref(st, lambda _, key=key, n=n: self._free(key, n))
            self.live += n
            self.peak = max(self.peak, self.live)
        return out


def nograd_forward_peak_bytes(preset: str, net: torch.nn.Module, batch: int, dtype: torch.dtype) -> int:
    """Peak bytes of the tensors a no-grad forward of the preset's ``net`` makes (a preview, a teacher sample),
    above its weights and inputs; on ``meta`` with the flash-attention memory of a GPU."""
    args, kw = preset_net_inputs(preset, net, batch, next(net.parameters()).device, dtype)
    net.eval()
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, *a, **k):
        # NOTE: the meta kernel of the CPU flash op materialises the [N, N] scores in a temporary, which a
        # GPU's flash kernel never does: a flash forward allocates its output (and a small log-sum-exp)
        if query.device.type != "meta":
            return original(query, key, value, *a, **k)
        return query.new_empty(*query.shape[:-1], value.shape[-1])

    F.scaled_dot_product_attention = sdpa
    try:
        with torch.no_grad(), torch_linear(), LiveBytes() as live:
            out = net(*args, **kw, return_dict=False)[0]
            del out
    finally:
        F.scaled_dot_product_attention = original
    return live.peak


def unet_saved_bytes(unet: torch.nn.Module, batch: int, size: int, dtype: torch.dtype,
                     grad_checkpointing: bool = False) -> int:
    """Saved-activation bytes of one training forward of ``unet`` (batch x C x size x size)."""
    device = next(unet.parameters()).device
    args, kw = unet_inputs(unet, batch, size, device, dtype)
    return _saved_bytes(unet, args, kw, grad_checkpointing)


def net_saved_bytes(preset: str, net: torch.nn.Module, batch: int, dtype: torch.dtype,
                    grad_checkpointing: bool = False) -> int:
    """Saved-activation bytes of one training forward of the preset's ``net`` at its latent size."""
    args, kw = preset_net_inputs(preset, net, batch, next(net.parameters()).device, dtype)
    return _saved_bytes(net, args, kw, grad_checkpointing)


def _saved_bytes(net: torch.nn.Module, args: tuple, kw: dict[str, Any], grad_checkpointing: bool) -> int:
    if grad_checkpointing:
        net.enable_gradient_checkpointing()
    else:
        with contextlib.suppress(Exception):
            net.disable_gradient_checkpointing()
    net.train()
    # NOTE: buffers are not activations either (SD3's pos_embed table: a slice of it may be saved)
    weights = [*net.parameters(), *net.buffers()]
    with torch.enable_grad(), flash_sdpa_on_meta(), torch_linear():
        return saved_tensor_bytes(lambda: net(*args, **kw, return_dict=False)[0], weights)


def preset_activation_bytes(preset: str, dtype: torch.dtype, grad_checkpointing: bool,
                            batch: int = 2) -> tuple[float, float]:
    """(bytes per sample, constant bytes) of one forward of the preset's denoiser at its latent size, on meta.

    Two batch sizes separate the per-sample part from the batch-independent part (the timestep
    embedding, the 77-token text projections of cross-attention are per sample too, but a few
    tensors are not).
    """
    net = build_preset_net(preset, "meta").to(dtype)
    b1 = net_saved_bytes(preset, net, batch, dtype, grad_checkpointing)
    b2 = net_saved_bytes(preset, net, 2 * batch, dtype, grad_checkpointing)
    per_sample = (b2 - b1) / batch
    return per_sample, max(0.0, b1 - per_sample * batch)
