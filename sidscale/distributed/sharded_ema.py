"""Generator EMA of the fp32 master weights, sharded exactly like DeepSpeed's ZeRO optimizer.

The EMA averages the fp32 master partition that the ZeRO optimizer holds on each rank, not
the bf16/fp16 working weights: at the recipe's lr (1e-6) one Adam step is far below bf16's
resolution of a weight, so the bf16 copy moves in jumps of one ulp while the masters move
smoothly, and an EMA of the bf16 copy would be an average of rounded weights. In fp32 mode the
masters equal the working weights bit for bit, so the EMA is the same as an EMA of the weights.
Under ``train.precision = pure_bf16`` the masters themselves are bf16 (no fp32 copy exists); the
EMA still keeps fp32 shards (``torch.float32`` copies, each update casts the master up), so its
averaging does not round to bf16's 8 significant bits.

Layout: one fp32 tensor per optimizer partition group, the same shape (padding included) and on
the same device as the optimizer's own flat master partition, so the update is one ``lerp_`` per
group, costs no communication, and the EMA is 1/N of the model per rank like the masters:

- ZeRO-1/2 (``DeepSpeedZeroOptimizer``): ``single_partition_of_fp32_groups[g]``;
- ZeRO-1 with bf16 and fp32 gradient accumulation (``BF16_Optimizer``): ``fp32_groups_flat_partition[g]``;
- ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): ``fp32_partitioned_groups_flat[g]`` (one per sub-group;
  on the CPU with ZeRO-Offload, so the EMA is there too).

Which parameter elements sit where is read from DeepSpeed's own mapping: each ZeRO-1/2 and
BF16_Optimizer parameter's ``_hp_mapping`` (fragment start in the parameter and in the
partition), and ZeRO-3's ``grad_position`` (sub-group, offset, partition numel) with the rank's
index in the parameter's partition group. It is stored as *segments* ``(param, param_start,
numel, group, offset)``: elements ``param_start:param_start+numel`` of the flattened parameter
are ``shards[group][offset:offset+numel]``. Each rank's checkpoint file holds its segments, so
the full EMA can be reassembled offline from the files alone (``sidscale.checkpoint``).

The full EMA exists only on rank 0's host, on demand (``gather_to_main``: previews and export),
gathered chunk by chunk; no rank ever holds a full-size copy on the device.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch

from sidscale.distributed import comm

# (param index, start in the flattened param, numel, group, offset in the group's flat partition)
Segment = tuple[int, int, int, int, int]

STATE_FORMAT = "optimizer-partition-v1"
# Elements of one gather chunk, all ranks together, on rank 0's communication device (fp32: 256 MiB).
GATHER_CHUNK_ELEMENTS = 64 * 2**20


class EMALayoutError(RuntimeError):
    pass


def master_partitions(optimizer) -> list[torch.Tensor]:
    """This rank's flat master partitions (fp32; bf16 under pure_bf16), one per group, as the ZeRO
    optimizer holds them now.

    Read anew at every use: DeepSpeed may replace these tensors (e.g. after offloading states).
    """
    for attr in ("fp32_partitioned_groups_flat",  # ZeRO-3
                 "fp32_groups_flat_partition",  # BF16_Optimizer (ZeRO-1 + bf16 + fp32 accumulation)
                 "single_partition_of_fp32_groups"):  # ZeRO-1/2
        flats = getattr(optimizer, attr, None)
        if flats is not None:
            if any(f.numel() == 0 for f in flats):
                raise EMALayoutError(
                    f"{type(optimizer).__name__}.{attr} has an empty partition: the fp32 masters are swapped out "
                    "(offload_optimizer.device = nvme), which the generator EMA does not support; use "
                    "offload_optimizer.device = cpu or none")
            return list(flats)
    raise EMALayoutError(
        f"the generator's optimizer is a {type(optimizer).__name__}, which holds no fp32 master partition that "
        "sidscale knows (expected a DeepSpeed ZeRO-1/2/3 optimizer or BF16_Optimizer): use zero_optimization.stage "
        "1, 2 or 3")


def _zero3_segments(module: torch.nn.Module, optimizer, index: dict[int, int]) -> list[Segment]:
    segments: list[Segment] = []
    for p in (p for group in optimizer.fp16_groups for p in group):
        group, offset, part_numel = optimizer.grad_position[optimizer.get_param_id(p)]
        start = optimizer._get_param_partition_rank(p) * part_numel
        numel = max(0, min(part_numel, p.ds_numel - start))  # the last rank's partition is padded
        if numel:
            segments.append((index[id(p)], start, numel, int(group), int(offset)))
    return segments


def _zero12_segments(module: torch.nn.Module, flats: Sequence[torch.Tensor], index: dict[int, int]) -> list[Segment]:
    segments: list[Segment] = []
    for p in module.parameters():
        m = getattr(p, "_hp_mapping", None)
        if m is None:  # no element of this parameter in this rank's partition
            continue
        group, offset = int(m.param_group_index), int(m.hp_fragment_address.start)
        # The fragment must be a view of the flat partition we average, where the address says.
        flat = flats[group]
        if (m.hp_fragment.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()
                or m.hp_fragment.storage_offset() != flat.storage_offset() + offset):
            raise EMALayoutError(f"DeepSpeed's _hp_mapping of a generator parameter does not point into its fp32 "
                                 f"partition {group} at offset {offset}: unsupported DeepSpeed layout")
        segments.append((index[id(p)], int(m.lp_fragment_address.start), int(m.lp_fragment_address.numel),
                         group, offset))
    return segments


def check_coverage(numels: Sequence[int], segments_per_rank: Sequence[Sequence[Segment]],
                   sizes_per_rank: Sequence[Sequence[int]], names: Sequence[str], what: str) -> None:
    """Every element of every parameter is in exactly one segment of one rank, inside its shard."""
    covered = [0] * len(numels)
    for rank, (segments, sizes) in enumerate(zip(segments_per_rank, sizes_per_rank, strict=True)):
        for param, start, numel, group, offset in segments:
            if start < 0 or start + numel > numels[param] or group >= len(sizes) or offset + numel > sizes[group]:
                raise EMALayoutError(f"{what}: rank {rank}'s EMA segment {(names[param], start, numel, group, offset)} "
                                     f"lies outside the parameter ({numels[param]} elements) or its shard")
            covered[param] += numel
    wrong = [(names[i], c, n) for i, (c, n) in enumerate(zip(covered, numels, strict=True)) if c != n]
    if wrong:
        name, c, n = wrong[0]
        raise EMALayoutError(f"{what}: the EMA shards cover {c} of {n} elements of {name} "
                             f"({len(wrong)} parameters wrong): the shards do not match the generator")


class ShardedEMA:
    """fp32 EMA of this rank's partition of the generator's fp32 master weights (module docstring)."""

    def __init__(self, module: torch.nn.Module, optimizer):
        self.names = [n for n, _ in module.named_parameters()]
        self.params = [p for _, p in module.named_parameters()]
        self.numels = [int(getattr(p, "ds_numel", p.numel())) for p in self.params]
        self.optimizer = optimizer
        self.rank, self.world_size = comm.rank(), comm.world_size()
        self.zero3 = hasattr(optimizer, "fp32_partitioned_groups_flat")
        flats = master_partitions(optimizer)
        index = {id(p): i for i, p in enumerate(self.params)}
        self.segments = (_zero3_segments(module, optimizer, index) if self.zero3
                         else _zero12_segments(module, flats, index))
        self.shards = [f.detach().to(torch.float32, copy=True) for f in flats]
        # Every rank's layout, for the coverage check (each rank raises the same error, none hangs)
        # and for rank 0's reassembly in gather_to_main. A few numbers per parameter and rank.
        table = (self.segments, [s.numel() for s in self.shards])
        tables = comm.all_gather_object(table)
        self.segments_per_rank = [t[0] for t in tables]
        self.sizes_per_rank = [t[1] for t in tables]
        check_coverage(self.numels, self.segments_per_rank, self.sizes_per_rank, self.names, "generator EMA")
        if any(sizes != self.sizes_per_rank[0] for sizes in self.sizes_per_rank):
            # ZeRO pads every rank's partition of a group to one size; gather_to_main relies on it.
            raise EMALayoutError(f"the fp32 master partitions differ in size between ranks ({self.sizes_per_rank})")

    @torch.no_grad()
    def update(self, beta: float) -> None:
        """``ema = beta * ema + (1 - beta) * master`` on this rank's partition (after the optimizer step)."""
        for ema, master in zip(self.shards, master_partitions(self.optimizer), strict=True):
            ema.lerp_(master.detach().to(ema.dtype), 1.0 - beta)

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "zero3": self.zero3, "world_size": self.world_size, "rank": self.rank,
                "segments": [list(s) for s in self.segments],
                "shards": [s.detach().to("cpu", copy=True) for s in self.shards]}

    def load_state_dict(self, state: dict) -> None:
        """Restore a shard saved by this layout (same world size, stage and DeepSpeed partition)."""
        if state.get("format") != STATE_FORMAT:
            raise EMALayoutError("the EMA shard was saved in an older layout (per-parameter slices of the working "
                                 "weights); load it with load_full(full_ema_from_checkpoint(ckpt))")
        if state["world_size"] != self.world_size or state["zero3"] != self.zero3:
            raise ValueError(
                f"EMA shard was saved with world_size={state['world_size']}, zero3={state['zero3']}; "
                f"this run has world_size={self.world_size}, zero3={self.zero3}"
            )
        if ([tuple(s) for s in state["segments"]] != self.segments
                or [s.shape for s in state["shards"]] != [s.shape for s in self.shards]):
            raise ValueError("EMA shard does not match this run's fp32 master partition (another ZeRO stage, "
                             "optimizer or generator?)")
        for dst, src in zip(self.shards, state["shards"], strict=True):
            dst.copy_(src)

    @torch.no_grad()
    def load_resharded(self, states: Iterable[dict], names: Sequence[str], what: str) -> None:
        """Fill this rank's partition from the EMA shards every rank of another world size saved
        (``states``: their ``state_dict()``s, any order; elastic resume). Only the overlap of each old
        segment with this rank's segments is copied, so the full EMA never exists on any rank; every
        element of this rank's partition must be covered exactly once."""
        if list(names) != self.names:
            raise EMALayoutError(f"{what}: the EMA was saved for other generator parameters than this run's")
        mine: dict[int, list[Segment]] = {}
        for seg in self.segments:
            mine.setdefault(seg[0], []).append(seg)
        covered = 0
        for st in states:
            if st.get("format") != STATE_FORMAT:
                raise EMALayoutError(f"{what}: an EMA shard of an older layout; cannot be resharded")
            for param, start, numel, group, offset in st["segments"]:
                for _, s, n, g, o in mine.get(param, ()):
                    a, b = max(start, s), min(start + numel, s + n)  # overlap, in parameter coordinates
                    if a < b:
                        src = st["shards"][group][offset + a - start:offset + b - start]
                        self.shards[g][o + a - s:o + b - s].copy_(src)
                        covered += b - a
        want = sum(seg[2] for seg in self.segments)
        if covered != want:
            raise EMALayoutError(f"{what}: the saved EMA shards cover {covered} of this rank's {want} elements")

    @torch.no_grad()
    def load_full(self, full: dict[str, torch.Tensor]) -> None:
        """Fill this rank's partition from a full EMA state dict (e.g. an older checkpoint's)."""
        missing = [n for n in self.names if n not in full]
        if missing:
            raise ValueError(f"full EMA state lacks {len(missing)} generator parameters, e.g. {missing[0]}")
        for param, start, numel, group, offset in self.segments:
            src = full[self.names[param]].reshape(-1)[start:start + numel]
            self.shards[group][offset:offset + numel].copy_(src)

    @torch.no_grad()
    def gather_to_main(self, chunk_elements: int = GATHER_CHUNK_ELEMENTS) -> dict[str, torch.Tensor] | None:
        """The full fp32 EMA state dict in rank 0's host memory; None on the other ranks.

        A collective: every rank must call it. Each group's shards are gathered to rank 0 in
        chunks of ``chunk_elements // world_size`` elements per rank, on the communication device
        (CUDA under NCCL), and rank 0 copies each received chunk into host tensors at once. The
        other ranks only send their own partition, chunk by chunk, and receive nothing.
        """
        main = self.rank == 0
        out = ({n: torch.empty(num, dtype=torch.float32) for n, num in zip(self.names, self.numels, strict=True)}
               if main else None)
        per_rank = max(1, chunk_elements // self.world_size)
        for group, shard in enumerate(self.shards):
            index = [_GroupIndex(segs, group) for segs in self.segments_per_rank] if main else None
            for lo in range(0, shard.numel(), per_rank):
                n = min(per_rank, shard.numel() - lo)
                parts = comm.gather_to_rank0(shard[lo:lo + n].float())
                if main:
                    for r, part in enumerate(parts):
                        index[r].scatter(out, self.names, part.cpu(), lo)
        if not main:
            return None
        return {n: t.view(getattr(p, "ds_shape", p.shape)) for (n, t), p in zip(out.items(), self.params, strict=True)}


@contextlib.contextmanager
def ema_swapped_into(engine, ema: ShardedEMA) -> Iterator[torch.nn.Module]:
    """ZeRO-3: ``engine.module`` running on the EMA for the block, on every rank (a collective: inside
    it every rank must run the same forwards, whose parameter gathers are collectives).

    Each rank copies its EMA shard (laid out like the fp32 master partition) into its partition of the
    working weights, and copies the saved partition back after the block. The device holds one extra
    partition (1/N of the model) instead of a whole network on rank 0 (15 GiB bf16 for SD3.5-Large,
    22 GiB for FLUX.1-dev). The EMA is cast to the working dtype. Gathered copies of the training
    weights (the persistent small parameters, prefetched ones) are released before the swap and after
    the restore, so no forward sees a mix; the persistent ones are gathered again at the end, as after
    an optimizer step."""
    opt = engine.optimizer
    flats = getattr(opt, "fp16_partitioned_groups_flat", None)
    if flats is None or len(flats) != len(ema.shards) or any(
            f is None or f.numel() != e.numel() for f, e in zip(flats, ema.shards, strict=True)):
        raise EMALayoutError("ema_swapped_into needs a ZeRO-3 engine whose working partitions match the EMA shards")
    saved = [f.detach().clone() for f in flats]
    engine.empty_partition_cache()
    with torch.no_grad():
        for flat, shard in zip(flats, ema.shards, strict=True):
            flat.copy_(shard)
    _copies_done(flats)
    training = engine.module.training
    engine.module.eval()
    try:
        yield engine.module
    finally:
        # Local work only: on the error path (an OOM or a bug on one rank) a collective here would wait
        # for peers that are not coming and turn a fast failure into a hang of dist.timeout_s.
        engine.module.train(training)
        engine.empty_partition_cache()
        with torch.no_grad():
            for flat, keep in zip(flats, saved, strict=True):
                flat.copy_(keep)
        _copies_done(flats)
        del saved
    # Normal exit only (every rank got here): the persistent parameters gathered again, as after a step.
    if opt.persistent_parameters:
        opt.persistent_parameters[0].all_gather(opt.persistent_parameters)


def _copies_done(flats: Sequence[torch.Tensor]) -> None:
    """Wait for the partition copies. NOTE: they run on the current stream while DeepSpeed's parameter
    gathers read the partitions on a stream of their own, with no dependency between the two."""
    if flats and flats[0].device.type == "cuda":
        torch.cuda.current_stream(flats[0].device).synchronize()


class _GroupIndex:
    """One rank's segments of one group, sorted by offset, to route a received chunk into parameters."""

    def __init__(self, segments: Sequence[Segment], group: int):
        self.segs = sorted((s for s in segments if s[3] == group), key=lambda s: s[4])
        self.ends = [s[4] + s[2] for s in self.segs]

    def scatter(self, out: dict[str, torch.Tensor], names: Sequence[str], chunk: torch.Tensor, lo: int) -> None:
        hi = lo + chunk.numel()
        for param, start, numel, _, offset in self.segs[bisect.bisect_right(self.ends, lo):]:
            if offset >= hi:
                break
            a, b = max(lo, offset), min(hi, offset + numel)  # the overlap, in partition coordinates
            out[names[param]][start + a - offset:start + b - offset].copy_(chunk[a - lo:b - lo])


def assemble_full(names: Sequence[str], shapes: Sequence[Sequence[int]], states: Sequence[dict],
                  what: str) -> dict[str, torch.Tensor]:
    """The full EMA from every rank's ``state_dict()`` (offline: no process group)."""
    numels = [int(torch.Size(s).numel()) for s in shapes]
    segments = [[tuple(s) for s in st["segments"]] for st in states]
    check_coverage(numels, segments, [[t.numel() for t in st["shards"]] for st in states], names, what)
    flat = [torch.empty(n, dtype=torch.float32) for n in numels]
    for st, segs in zip(states, segments, strict=True):
        for param, start, numel, group, offset in segs:
            flat[param][start:start + numel].copy_(st["shards"][group][offset:offset + numel])
    return {n: f.view(tuple(s)) for n, f, s in zip(names, flat, shapes, strict=True)}
