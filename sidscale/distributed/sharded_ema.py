"""Generator EMA sharded across data-parallel ranks, like the ZeRO optimizer state.

Each rank keeps fp32 EMA values for 1/world_size of the generator's elements:
- ZeRO-1/2: parameters are replicated, so the flattened parameter vector is cut into equal
  contiguous slices and rank r averages slice r.
- ZeRO-3: parameters are already partitioned (``param.ds_tensor`` is this rank's shard), so
  the EMA follows that partition exactly.
The full EMA weights exist only on demand (``gather_full``): export and previews.
"""

from __future__ import annotations

import torch

from sidscale.distributed import comm


def _is_zero3_param(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_tensor")


class ShardedEMA:
    def __init__(self, module: torch.nn.Module, rank: int, world_size: int):
        self.names = [n for n, _ in module.named_parameters()]
        self.params = [p for _, p in module.named_parameters()]
        self.rank, self.world_size = rank, world_size
        self.zero3 = any(_is_zero3_param(p) for p in self.params)
        self.segments: list[tuple[int, int, int]] = []  # (param index, start, end) of this rank's slice
        if self.zero3:
            self.shards = [p.ds_tensor.detach().float().clone() for p in self.params]
        else:
            total = sum(p.numel() for p in self.params)
            per_rank = -(-total // world_size)
            lo, hi = rank * per_rank, min((rank + 1) * per_rank, total)
            offset = 0
            self.shards = []
            for i, p in enumerate(self.params):
                start, end = max(lo, offset), min(hi, offset + p.numel())
                if start < end:
                    self.segments.append((i, start - offset, end - offset))
                    self.shards.append(p.detach().reshape(-1)[start - offset:end - offset].float().clone())
                offset += p.numel()

    def _local_views(self) -> list[torch.Tensor]:
        if self.zero3:
            return [p.ds_tensor for p in self.params]
        return [self.params[i].detach().reshape(-1)[s:e] for i, s, e in self.segments]

    @torch.no_grad()
    def update(self, beta: float) -> None:
        for ema, cur in zip(self.shards, self._local_views(), strict=True):
            ema.lerp_(cur.detach().to(ema.dtype), 1.0 - beta)

    def state_dict(self) -> dict:
        return {"zero3": self.zero3, "world_size": self.world_size, "rank": self.rank,
                "shards": [s.clone() for s in self.shards]}

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.world_size or state["zero3"] != self.zero3:
            raise ValueError(
                f"EMA shard was saved with world_size={state['world_size']}, zero3={state['zero3']}; "
                f"this run has world_size={self.world_size}, zero3={self.zero3}"
            )
        if len(state["shards"]) != len(self.shards):
            raise ValueError("EMA shard does not match the generator's parameters")
        for dst, src in zip(self.shards, state["shards"], strict=True):
            dst.copy_(src)

    @torch.no_grad()
    def gather_full(self) -> dict[str, torch.Tensor]:
        """Every rank gets the full fp32 EMA state dict (a collective: all ranks must call)."""
        if self.zero3:
            out = {}
            for name, p, shard in zip(self.names, self.params, self.shards, strict=True):
                parts = comm.all_gather(shard)
                out[name] = torch.cat(parts)[: p.ds_numel].view(p.ds_shape).clone()
            return out
        # NOTE: a rank without elements (tiny model, many ranks) still needs a tensor on the params' device.
        local = torch.cat(self.shards) if self.shards else torch.zeros(0, device=self.params[0].device)
        total = sum(p.numel() for p in self.params)
        per_rank = -(-total // self.world_size)
        padded = torch.zeros(per_rank, dtype=torch.float32, device=local.device)
        padded[: local.numel()] = local
        parts = comm.all_gather(padded)
        flat = torch.cat(parts)[:total]
        out, offset = {}, 0
        for name, p in zip(self.names, self.params, strict=True):
            out[name] = flat[offset:offset + p.numel()].view(p.shape).clone()
            offset += p.numel()
        return out
