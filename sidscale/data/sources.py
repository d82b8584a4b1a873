"""Which prompt source a run reads (``data.shards``): the toy prompts by index, toy shards written into the
run directory, or a stream of prompt tars / a manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sidscale.data.prompts import INDEXED_PREFIX, IndexedPromptSource, StreamPromptSource
from sidscale.distributed import comm
from sidscale.errors import ConfigError


def toy_prompts(teacher_path: Path) -> list[str]:
    """The toy prompts of this teacher's mixture (or of the default mixture for SD teachers)."""
    from sidscale.families.toy.fit import load_toy_mixture
    from sidscale.families.toy.mixture import ToyMixture

    if (Path(teacher_path) / "toy_mixture.json").is_file():
        return load_toy_mixture(teacher_path).prompts
    return ToyMixture().prompts


def build_prompt_source(cfg: Any, run_dir: Path, teacher: Any, rank: int, world: int, is_main: bool) -> Any:
    """The prompt source of ``cfg.data`` for this rank (a collective when ``data.shards = toy``: rank 0
    writes the toy shards, the others wait)."""
    d = cfg.data
    if d.shards.startswith(INDEXED_PREFIX):
        name = d.shards[len(INDEXED_PREFIX):]
        if name != "toy":
            raise ConfigError(f"data.shards = {d.shards!r}: the only indexed source is 'indexed:toy'")
        return IndexedPromptSource(toy_prompts(teacher.path), cfg.train.seed)
    shards = d.shards
    if shards == "toy":
        shards = str(Path(run_dir) / "data" / "toy_prompts" / "manifest.json")
        if is_main and not Path(shards).is_file():
            from sidscale.data.shards import write_prompt_shards

            write_prompt_shards(toy_prompts(teacher.path), Path(shards).parent, shard_size=4, overwrite=True)
        comm.barrier()
    if shards.startswith("/path/to/"):
        raise ConfigError(f"data.shards = {shards!r} is the preset's placeholder: give your prompt tars "
                          "(tools/make_prompt_shards.py) or a manifest.json")
    if not shards:
        raise ConfigError("data.shards is empty: give a brace pattern of prompt tars, a manifest.json "
                          "(tools/make_prompt_shards.py makes both), or 'toy'")
    return StreamPromptSource(shards, rank=rank, world_size=world, batch_size=cfg.train.micro_batch,
                              seed=cfg.train.seed, num_workers=d.num_workers,
                              shuffle_buffer=d.shuffle_buffer, resampled=d.resampled,
                              tokenize=teacher.conditioner.tokenize)
