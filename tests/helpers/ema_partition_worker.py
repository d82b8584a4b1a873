"""One rank of the 2-rank EMA partition check (tests/trainer/test_numerics.py launches it under torchrun).

For ZeRO-1 (BF16_Optimizer), ZeRO-2 and ZeRO-3 with bf16 on a small module whose parameters
straddle the rank boundary: after one optimizer step, the EMA copied from the masters equals
DeepSpeed's own full fp32 masters (``safe_get_full_fp32_param``), rank 0's ``gather_to_main``
equals the concatenation of the ranks' shards (routed by their segments) and the offline
reassembly of the saved per-rank states, and rank 1 receives no tensor from any collective
during the gather (it only sends its own chunks). Writes ``rank{R}.json`` into argv[1].
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

CHUNK = 10  # elements per gather chunk, all ranks together: 5 per rank, so shards take several chunks


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(7, 5)  # 35 + 5
        self.b = torch.nn.Linear(5, 3)  # 15 + 3
        self.c = torch.nn.Parameter(torch.randn(11))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).sum() + (self.c * self.c).sum() * x.sum()


class RecordCollectives:
    """Wraps torch.distributed's collectives to record what this rank receives into."""

    NAMES = ("gather", "all_gather", "all_gather_into_tensor", "broadcast", "recv", "irecv", "scatter",
             "all_reduce", "reduce", "all_gather_object", "broadcast_object_list", "gather_object")

    def __init__(self):
        self.calls: list[dict] = []
        self.saved = {}

    def __enter__(self):
        for name in self.NAMES:
            fn = getattr(dist, name)
            self.saved[name] = fn

            def wrapper(*args, _fn=fn, _name=name, **kwargs):
                tensors = [a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a)]
                lists = [a for a in list(args) + list(kwargs.values()) if isinstance(a, list)]
                self.calls.append({"op": _name, "numel": [t.numel() for t in tensors],
                                   "list_items": sum(len(v) for v in lists)})
                return _fn(*args, **kwargs)

            setattr(dist, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def check_stage(stage: int, out: dict) -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from sidscale.distributed.sharded_ema import ShardedEMA, assemble_full

    ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": stage}, "bf16": {"enabled": True},
          "data_types": {"grad_accum_dtype": "fp32"}, "steps_per_print": 10**9}
    if stage == 1:
        ds["communication_data_type"] = "fp32"
    if stage == 3:  # the biases (5, 3 elements) stay gathered whole (persistent); the rest is partitioned
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 10
    net = Net()
    engine, *_ = deepspeed.initialize(model=net, optimizer=torch.optim.Adam(net.parameters(), lr=1e-3), config=ds)
    ema = ShardedEMA(engine.module, engine.optimizer)
    x = torch.randn(7, generator=torch.Generator().manual_seed(dist.get_rank())).to(torch.bfloat16)
    engine.backward(engine(x))
    engine.step()
    ema.update(0.0)  # beta 0: the EMA is a copy of the masters after the step
    masters = {n: safe_get_full_fp32_param(p).detach().float().cpu().view(tuple(getattr(p, "ds_shape", p.shape)))
               for n, p in engine.module.named_parameters()}
    # the concatenation of every rank's shards, gathered by the test's own collective
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, ema.state_dict())
    with RecordCollectives() as rec:
        full = ema.gather_to_main(chunk_elements=CHUNK)
    res: dict = {"optimizer": type(engine.optimizer).__name__, "calls": rec.calls,
                 "shard_sizes": [s.numel() for s in ema.shards],
                 "full_numel": sum(getattr(p, "ds_numel", p.numel()) for p in net.parameters())}
    if dist.get_rank() == 0:
        shapes = [tuple(getattr(p, "ds_shape", p.shape)) for p in engine.module.parameters()]
        offline = assemble_full(ema.names, shapes, states, "2-rank states")
        # the shards' concatenation in partition order: ZeRO-1/2 keep one flat vector of all
        # parameters in order, cut into equal rank partitions (the tail padded)
        if stage in (1, 2):
            cat = torch.cat([s["shards"][0] for s in states])[: res["full_numel"]]
            res["full_equals_concat"] = torch.equal(cat, torch.cat([full[n].reshape(-1) for n in ema.names]))
        res["full_equals_masters"] = all(torch.equal(full[n], masters[n]) for n in masters)
        res["full_equals_offline"] = all(torch.equal(full[n], offline[n]) for n in masters)
        res["masters_moved"] = any(not torch.equal(masters[n], p.detach().float())
                                   for n, p in Net().named_parameters())
        res["split_params"] = sum(1 for n in ema.names
                                  if sum(s[2] for s in ema.segments_per_rank[0] if ema.names[s[0]] == n)
                                  not in (0, masters[n].numel()))
    else:
        res["full_is_none"] = full is None
    if stage == 3:
        res.update(check_swap(engine, ema, states, x))
    out[f"zero{stage}"] = res


def check_swap(engine, ema, states: list, x: torch.Tensor) -> dict:
    """ZeRO-3 previews (``ema_swapped_into``): with an EMA far from the weights (halved), inside the block
    the partitioned module computes what a plain net holding the EMA in bf16 computes (persistent
    parameters included), and after it what it computed before."""
    from sidscale.distributed.sharded_ema import assemble_full, ema_swapped_into

    for shard in ema.shards:
        shard.mul_(0.5)
    dist.all_gather_object(states, ema.state_dict())
    shapes = [tuple(getattr(p, "ds_shape", p.shape)) for p in engine.module.parameters()]
    full_ema = assemble_full(ema.names, shapes, states, "2-rank states")
    plain = Net().to(torch.bfloat16)
    plain.load_state_dict({n: v.to(torch.bfloat16) for n, v in full_ema.items()})
    persistent = [n for n, p in engine.module.named_parameters() if getattr(p, "ds_persist", False)]
    with torch.no_grad():
        before = engine.module(x)
        with ema_swapped_into(engine, ema) as module:
            swapped = module(x)
        after = engine.module(x)
        want = plain(x)
    return {"swap_equals_plain_ema": bool(torch.equal(swapped, want)),
            "swap_restores": bool(torch.equal(after, before)),
            "swap_differs_from_weights": not torch.equal(swapped, before), "persistent": persistent}


def main() -> None:
    from sidscale.distributed.runtime import init_distributed

    init_distributed()
    out: dict = {}
    for stage in (1, 2, 3):
        check_stage(stage, out)
    Path(sys.argv[1], f"rank{dist.get_rank()}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
