"""Metrics: the on-device window of per-step statistics, its reduction over the ranks at logging steps,
and rank 0's progress (a tqdm bar, TensorBoard scalars under RUN/tb/, preview grids under RUN/samples/)."""

from __future__ import annotations

import io
import math
import resource
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from sidscale.core.io import atomic_write_bytes
from sidscale.distributed import comm

PREVIEW_MIN_PX = 128  # small images (the toy's 16 px) are upscaled, nearest, to at least this
TILE_PAD, BLOCK_GAP, TEXT_PAD = 4, 16, 4
BACKGROUND, TEXT, SUBTLE = (255, 255, 255), (0, 0, 0), (90, 90, 90)


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int = 3) -> list[str]:
    """Greedy word wrap to ``width`` px; the last line ends in "..." when the text does not fit."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        while lines[-1] and draw.textlength(lines[-1] + "...", font=font) > width:
            lines[-1] = lines[-1][:-1]
        lines[-1] += "..."
    return lines


def upscale_factor(height: int, width: int, min_px: int = PREVIEW_MIN_PX) -> int:
    """The integer nearest-neighbour factor that brings the smaller side to at least ``min_px``."""
    return max(1, math.ceil(min_px / min(height, width)))


def preview_grid(
    images: torch.Tensor, prompts: Sequence[str], per_prompt: int, reference: torch.Tensor | None = None,
    headers: Sequence[str] = ("student", "teacher"), min_px: int = PREVIEW_MIN_PX,
) -> tuple[Image.Image, dict[str, list[list[tuple[int, int, int, int]]]]]:
    """A readable grid: one row per prompt, captioned with the prompt, its ``per_prompt`` images
    (in [-1, 1], prompt-major: image ``r * per_prompt + j`` is prompt r, seed j), upscaled (nearest)
    to at least ``min_px``; ``reference`` (same layout, e.g. the teacher's samples for the same
    prompts and seeds) to their right. Returns the image and each tile's box, per block and row."""
    from sidscale.sample import to_uint8

    blocks = [("images", images)] + ([("reference", reference)] if reference is not None else [])
    n, _, h, w = images.shape
    if n != len(prompts) * per_prompt or (reference is not None and reference.shape != images.shape):
        raise ValueError(f"preview: {n} images for {len(prompts)} prompts x {per_prompt} (reference "
                         f"{None if reference is None else tuple(reference.shape)})")
    f = upscale_factor(h, w, min_px)
    th, tw = h * f, w * f
    block_w = per_prompt * tw + (per_prompt - 1) * TILE_PAD
    width = len(blocks) * block_w + (len(blocks) - 1) * BLOCK_GAP + 2 * TILE_PAD
    font, small = _font(12), _font(11)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(sum(abs(v) for v in font.getmetrics())) + 2 if hasattr(font, "getmetrics") else 13
    captions = [_wrap(scratch, f"{r + 1}. {q}", font, width - 2 * TILE_PAD) for r, q in enumerate(prompts)]
    header_h = line_h + 2 * TEXT_PAD
    height = header_h + sum(len(c) * line_h + TEXT_PAD + th + TILE_PAD for c in captions) + TILE_PAD
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    pixels = {name: to_uint8(x.detach().float().cpu()).permute(0, 2, 3, 1).numpy() for name, x in blocks}
    boxes: dict[str, list[list[tuple[int, int, int, int]]]] = {name: [] for name, _ in blocks}
    for b, (name, _) in enumerate(blocks):
        x0 = TILE_PAD + b * (block_w + BLOCK_GAP)
        label = _wrap(scratch, headers[b] if b < len(headers) else name, small, block_w, max_lines=1)[0]
        draw.text((x0, TEXT_PAD), label, fill=SUBTLE, font=small)
    y = header_h
    for r, caption in enumerate(captions):
        for line in caption:
            draw.text((TILE_PAD, y), line, fill=TEXT, font=font)
            y += line_h
        y += TEXT_PAD
        for b, (name, _) in enumerate(blocks):
            row = []
            for j in range(per_prompt):
                x = TILE_PAD + b * (block_w + BLOCK_GAP) + j * (tw + TILE_PAD)
                tile = np.repeat(np.repeat(pixels[name][r * per_prompt + j], f, axis=0), f, axis=1)
                canvas.paste(Image.fromarray(np.ascontiguousarray(tile), mode="RGB"), (x, y))
                row.append((x, y, x + tw, y + th))
            boxes[name].append(row)
        y += th + TILE_PAD
    return canvas, boxes


def peak_memory_bytes(device: torch.device) -> dict[str, float]:
    """Peak device memory (CUDA) and peak host RSS of this process."""
    out = {"host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30}
    if device.type == "cuda":
        out["device_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


class RunLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, global_batch: int, enabled: bool,
                 desc: str = "training"):
        """``desc``: the bar's name, the method the run uses (``sidscale.terminal.method_label``)."""
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.global_batch = global_batch
        self.bar = None
        self.tb = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        from sidscale.terminal import progress

        self.tb = SummaryWriter(str(self.run_dir / "tb"))
        self.bar = progress(total_steps, desc, initial=start_step)

    def step(self, step: int, images_seen: int) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            self.tb.add_scalar(k, v, step)
        if "progress/kimg" not in values:  # e.g. end-of-run evaluation scalars: keep the bar as it is
            return
        # short keys: the postfix has to fit beside the bar in an ordinary terminal
        show = {name: f"{values[k]:.4g}" for k, name in (("loss/fake", "fake"), ("loss/gen", "gen"),
                                                          ("perf/images_per_s", "img/s")) if k in values}
        show["kimg"] = f"{values['progress/kimg']:.2f}"
        if self.bar is not None:
            # NOTE: shown now: the bar advanced to this step before its numbers were known, and with
            # refresh=False they would first appear one step later (and the last ones only at close).
            self.bar.set_postfix(show, refresh=True)

    def end_progress(self) -> None:
        """Training is over: the bar's last line (final step, final numbers, training time) stays above
        what follows (export, evaluation), instead of being redrawn below each of their lines."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def preview(self, step: int, images: torch.Tensor, prompts: Sequence[str], per_prompt: int,
                reference: torch.Tensor | None = None, headers: Sequence[str] = ("student", "teacher")) -> Path | None:
        """Save ``preview_grid`` of images in [-1, 1] as RUN/samples/step_XXXXXXXX.png and log it to
        TensorBoard (``preview/ema``)."""
        if not self.enabled:
            return None
        grid, _ = preview_grid(images, prompts, per_prompt, reference, headers)
        buf = io.BytesIO()
        grid.save(buf, format="png")
        path = self.run_dir / "samples" / f"step_{step:08d}.png"
        atomic_write_bytes(path, buf.getvalue())
        self.tb.add_image("preview/ema", np.asarray(grid), step, dataformats="HWC")
        return path

    def write(self, message: str) -> None:
        if self.enabled:
            if self.bar is not None:
                self.bar.write(message, file=sys.stdout)
            else:
                print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


class StatsWindow:
    """Per-step statistics summed on their device between logging steps.

    NOTE: nothing here syncs with the host: the one host sync is the all-reduce + ``.tolist()`` of
    ``reduce_over_ranks`` at logging steps (an ``.item()`` per step would stall the GPU pipeline)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for k, v in stats.items():
            self.sums[k] = v.detach().float() + self.sums[k] if k in self.sums else v.detach().float()
        self.steps += 1

    def means(self) -> dict[str, torch.Tensor]:
        return {k: v / self.steps for k, v in self.sums.items()}

    def clear(self) -> None:
        self.sums.clear()
        self.steps = 0


def reduce_over_ranks(stats: dict[str, torch.Tensor], device: torch.device, world: int) -> dict[str, float]:
    """The mean of each statistic over the ranks (a collective: every rank calls it at the same step)."""
    keys = sorted(stats)
    vec = comm.all_reduce(torch.stack([stats[k].float().to(device) for k in keys]))
    return dict(zip(keys, (vec / world).tolist(), strict=True))


def step_scalars(vals: dict[str, float], world: int, tags: Mapping[str, tuple[str, bool, float | None]]
                 ) -> dict[str, float]:
    """The TensorBoard scalars of the (rank-averaged) statistics ``vals``. ``tags`` (the method's
    ``stat_tags``): stat -> (tag, whether it is a sum over the job (scaled by the number of ranks), the
    value logged when the stat is absent this window, None: always present). Other stats: ``method/<stat>``."""
    out = {}
    for k, (tag, by_world, default) in tags.items():
        value = vals[k] if k in vals or default is None else default
        out[tag] = value * (world if by_world else 1)
    out.update({f"method/{k}": v for k, v in vals.items() if k not in tags})
    return out
