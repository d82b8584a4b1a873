"""Which prompt source a run reads (``data.shards``): the toy prompts by index, toy shards written into the
run directory, or a stream of prompt tars / a manifest; and which real pairs the adversarial method reads
(``data.real_shards``): the toy mixture's exact samples written into the run directory, or real-pair tars."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sidscale.data.prompts import INDEXED_PREFIX, IndexedPromptSource, StreamPromptSource
from sidscale.distributed import comm
from sidscale.errors import ConfigError

# data.real_shards = toy: exact samples per shard (TOY_REAL_COUNT = 4096 of them: 64 shards, enough for
# world_size x data.num_workers <= 64)
TOY_REAL_SHARD = 64


def toy_mixture(teacher_path: Path) -> Any:
    """This teacher's toy mixture (or the default mixture for SD teachers)."""
    from sidscale.families.toy.fit import load_toy_mixture
    from sidscale.families.toy.mixture import ToyMixture

    if (Path(teacher_path) / "toy_mixture.json").is_file():
        return load_toy_mixture(teacher_path)
    return ToyMixture()


def toy_prompts(teacher_path: Path) -> list[str]:
    """The toy prompts of this teacher's mixture (or of the default mixture for SD teachers)."""
    return toy_mixture(teacher_path).prompts


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


def build_real_source(cfg: Any, run_dir: Path, teacher: Any, rank: int, world: int, is_main: bool) -> Any:
    """The real-pair source of ``cfg.data.real_shards`` for this rank (``RealPairSource``), None unless
    ``method.adversarial.enabled``. A collective when ``data.real_shards = toy``: rank 0 writes the toy
    mixture's exact samples into the run directory, the others wait."""
    if not cfg.method.adversarial.enabled:
        return None
    from sidscale.data.real_pairs import RealPairSource

    d = cfg.data
    shards = d.real_shards
    if shards == "toy":
        if not cfg.teacher.is_toy:
            raise ConfigError(f"data.real_shards = 'toy' is the toy mixture's exact samples, for the toy teachers "
                              f"only (teacher.kind = {cfg.teacher.kind!r}): give real-pair tars "
                              "(tools/make_real_shards.py) or a manifest.json")
        shards = str(Path(run_dir) / "data" / "toy_real" / "manifest.json")
        if is_main and not Path(shards).is_file():
            from sidscale.data.real_shards import TOY_REAL_COUNT, write_toy_real_shards

            write_toy_real_shards(toy_mixture(teacher.path), Path(shards).parent, count=TOY_REAL_COUNT,
                                  seed=cfg.train.seed, teacher_kind=cfg.teacher.kind, shard_size=TOY_REAL_SHARD,
                                  overwrite=True)
        comm.barrier()
    if shards.startswith("/path/to/"):
        raise ConfigError(f"data.real_shards = {shards!r} is the preset's placeholder: give your real-pair tars "
                          "(tools/make_real_shards.py) or a manifest.json")
    return RealPairSource(shards, rank=rank, world_size=world, batch_size=cfg.train.micro_batch, seed=cfg.train.seed,
                          num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer, resampled=d.resampled,
                          latent_shape=tuple(teacher.latent_shape), image_size=int(cfg.teacher.resolution))
