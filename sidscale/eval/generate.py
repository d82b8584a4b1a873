"""Resumable, sharded image generation for evaluation: image i = prompt i with seed i.

Sharding: the index range is cut into chunks of ``batch`` consecutive images, and chunk k belongs to
rank ``k % world``. Every image is therefore computed in the same batch, with the same neighbours,
whatever the number of ranks and whatever was already on disk: a resume regenerates a whole chunk
and writes only its missing files. (Sharding single indices, i % world, would put image i in a
different batch for every world size; GPU kernels are not batch-invariant in their last bits, so
after uint8 rounding a few pixels could differ.) Image i depends on ``--batch``, device and dtype.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sidscale.eval.images import image_path, missing_images, save_png_atomic
from sidscale.sample import seeded_latent_noise, to_uint8
from sidscale.terminal import progress

log = logging.getLogger(__name__)

SampleFn = Callable[[Sequence[str], Sequence[int]], torch.Tensor]  # prompts, seeds -> [B, 3, H, W] in [-1, 1]


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0


def rank_from_env(rank: int | None = None, world: int | None = None) -> RankInfo:
    """torchrun / deepspeed set RANK, WORLD_SIZE, LOCAL_RANK; srun sets SLURM_PROCID, SLURM_NTASKS,
    SLURM_LOCALID; plain python is one rank. Explicit arguments win (tests simulate ranks with them)."""
    env = os.environ
    r = rank if rank is not None else int(env.get("RANK", env.get("SLURM_PROCID", "0")))
    w = world if world is not None else int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", "1")))
    local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", "0")))
    if not 0 <= r < w:
        raise ValueError(f"rank {r} outside world size {w}")
    return RankInfo(r, w, local)


def read_prompts(path: str | os.PathLike, num: int | None = None) -> list[str]:
    """The prompt file's captions, each stripped of surrounding whitespace, empty lines skipped, as
    SiD-LSG's and SiD-DiT's generation scripts read them (``read_file_to_sentences``): prompt i is
    the i-th non-empty line. The first ``num`` of them."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: file not found (one prompt per line)")
    # NOTE: split on newlines only: str.splitlines would also split inside a caption at \x0c, \x1c..
    # \x1e, \x85 or \u2028, which the reference's ``for line in file`` does not
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").split("\n")]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts in the file (expected one prompt per line)")
    if num is not None:
        if num < 1 or num > len(prompts):
            raise ValueError(f"--num {num}: the prompt file {path} has {len(prompts)} prompts")
        prompts = prompts[:num]
    return prompts


def chunks_for_rank(num: int, batch: int, rank: int, world: int) -> Iterator[range]:
    for k in range(math.ceil(num / batch)):
        if k % world == rank:
            yield range(k * batch, min((k + 1) * batch, num))


def protocol_pixels(images: torch.Tensor, offset: float = 128.0) -> torch.Tensor:
    """[-1, 1] floats -> uint8 as the protocol's code converts them: ``uint8(clip(x * 127.5 + offset))``
    (truncating); offset 128 is SiD-LSG's / SiD-DiT's ``to_uint8``, 127.5 DMD2's ``(x + 1) * 127.5``."""
    if offset == 128.0:
        return to_uint8(images)
    return ((images + 1.0) * 127.5).clamp(0, 255).to(torch.uint8)


def generate_images(
    sample_fn: SampleFn, prompts: Sequence[str], out_dir: Path, batch: int, rank: int = 0, world: int = 1,
    pixel_offset: float = 128.0,
) -> tuple[int, float]:
    """Write this rank's missing ``out_dir/{i:06d}.png``; returns (images written, seconds spent).
    Rank 0 shows a progress bar with ETA over its own share (the ranks' shares differ by one chunk at most)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, seconds = 0, 0.0
    # the chunks with missing images, found first so that the bar counts only what is generated now
    # (its rate and ETA would otherwise include the chunks a resume skips)
    plan = [(idx, todo) for idx in chunks_for_rank(len(prompts), batch, rank, world)
            if (todo := missing_images(out_dir, idx))]
    share = f" (rank 0's share of {len(prompts)}, {world} ranks)" if world > 1 else ""
    bar = progress(sum(len(idx) for idx, _ in plan), f"generating {out_dir.name}{share}", rank == 0 and bool(plan),
                   unit="img")
    for idx, todo in plan:
        t0 = time.perf_counter()
        pixels = protocol_pixels(sample_fn([prompts[i] for i in idx], list(idx)).float().cpu(), pixel_offset)
        pixels = pixels.permute(0, 2, 3, 1).numpy()
        for j, i in enumerate(idx):
            if i in todo:
                save_png_atomic(image_path(out_dir, i), np.ascontiguousarray(pixels[j]))
        written += len(todo)
        seconds += time.perf_counter() - t0
        bar.update(len(idx))
    bar.close()
    return written, seconds


def wait_for_images(out_dir: Path, num: int, timeout_s: float, poll_s: float = 10.0) -> None:
    """Rank 0 waits for the other ranks' files (file-based: works under torchrun, srun or by hand,
    without a process group)."""
    deadline = time.monotonic() + timeout_s
    todo = list(range(num))
    while True:
        todo = missing_images(out_dir, todo)
        if not todo:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{out_dir}: {len(todo)} of {num} images still missing after {timeout_s:.0f} s "
                               f"(first: {todo[:5]}); did another rank fail? Rerun to resume.")
        time.sleep(poll_s)


def one_step_sampler(export_dir: Path, device: str, dtype: str) -> SampleFn:
    from sidscale.sample import FewStepPipeline as OneStepPipeline

    pipe = OneStepPipeline.from_export(export_dir, device, dtype)
    return lambda prompts, seeds: pipe(prompts, seeds)


def teacher_sampler(sampling: dict, device: str, dtype: str, steps: int, cfg_scale: float) -> SampleFn:
    """The teacher's own multi-step sampler (its family's ``teacher_sampler``: DDIM for UNet/VP
    teachers, the flow Euler sampler of the teacher's scheduler for SD3), ``steps`` steps, CFG
    ``cfg_scale``, x_T of image i from seed i (the first noise the student draws for image i)."""
    from sidscale.config import config_from_dict
    from sidscale.families import family_for_kind

    family = family_for_kind(sampling["teacher_kind"])
    teacher_keys = {"kind": sampling["teacher_kind"], "path": sampling["teacher_path"], "dtype": dtype,
                    "prediction_type": sampling.get("prediction_type", "auto"),
                    "resolution": int(sampling["resolution"])}
    if "t5" in sampling:  # SD3: the text side the run trained with
        teacher_keys.update(t5=bool(sampling["t5"]), max_sequence_length=int(sampling["max_sequence_length"]))
    if teacher_keys["prediction_type"] not in ("auto", "epsilon", "v_prediction"):
        teacher_keys["prediction_type"] = "auto"  # flow teachers record "velocity"
    teacher = family.load_teacher(config_from_dict({"teacher": teacher_keys}, "<export sidscale.json>"), device)

    @torch.no_grad()
    def sample(prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        x0 = family.teacher_sampler(teacher, teacher.conditioner.encode(prompts),
                                    teacher.conditioner.empty(len(prompts)), cfg_scale, steps,
                                    x_T=seeded_latent_noise(seeds, teacher.latent_shape))
        return family.decode(teacher.vae, x0, teacher.scaling_factor, teacher.shift_factor)

    return sample
