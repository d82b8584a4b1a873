"""Rank-0 progress: a tqdm bar, TensorBoard scalars under RUN/tb/, preview grids under RUN/samples/."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

from sidscale.io_utils import atomic_write_bytes


def peak_memory_bytes(device: torch.device) -> dict[str, float]:
    """Peak device memory (CUDA) and peak host RSS of this process."""
    out = {"host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30}
    if device.type == "cuda":
        out["device_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


class RunLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, global_batch: int, enabled: bool):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.global_batch = global_batch
        self.bar = None
        self.tb = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.tb = SummaryWriter(str(self.run_dir / "tb"))
        self.bar = tqdm(total=total_steps, initial=start_step, unit="it", dynamic_ncols=True, file=sys.stdout,
                        desc="sid-lsg", mininterval=1.0)

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
        show = {k.split("/")[-1]: f"{values[k]:.4g}" for k in ("loss/fake", "loss/gen", "perf/images_per_s")
                if k in values}
        show["kimg"] = f"{values['progress/kimg']:.2f}"
        self.bar.set_postfix(show, refresh=False)

    def preview(self, step: int, images: torch.Tensor, nrow: int) -> Path | None:
        """Save a grid of images in [-1, 1] as RUN/samples/step_XXXXXXXX.png and log it."""
        if not self.enabled:
            return None
        import io

        from torchvision.utils import make_grid, save_image

        grid = make_grid(((images.float().clamp(-1, 1) + 1) / 2).cpu(), nrow=nrow, padding=1)
        buf = io.BytesIO()
        save_image(grid, buf, format="png")
        path = self.run_dir / "samples" / f"step_{step:08d}.png"
        atomic_write_bytes(path, buf.getvalue())
        self.tb.add_image("preview/ema", grid, step)
        return path

    def write(self, message: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
