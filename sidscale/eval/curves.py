"""FID and CLIP score against kimg for every evaluated checkpoint of a run: ``tools/fid_eval.py --plot RUN``.

Reads ``RUN/eval/*/metrics.json`` (what ``slurm/eval.sh`` and ``tools/fid_eval.py --out RUN/eval/NAME``
write), keeps those of one protocol, and draws two panels (FID, CLIP score) against kimg into one PNG
(default ``RUN/eval/curves.png``), with the teacher's numbers as a dashed line where they were
evaluated. Drawn with PIL (matplotlib is not a dependency).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from sidscale.eval.protocols import DEFAULT_PROTOCOL, PROTOCOLS

log = logging.getLogger("sidscale.eval")

WIDTH, HEIGHT = 1200, 480
MARGIN = (80, 50, 30, 60)  # left, top, right, bottom of each panel's plot box
BACKGROUND, AXES, GRID = (255, 255, 255), (0, 0, 0), (225, 225, 225)
LINE, TEACHER = (31, 119, 180), (214, 39, 40)


@dataclass
class EvalPoint:
    name: str  # RUN/eval/<name>
    kimg: float
    step: int | None
    fid: float
    clip_score: float | None
    teacher_fid: float | None = None
    teacher_clip: float | None = None


@dataclass
class Panel:
    """Where a panel's data landed: the plot box and the data -> pixel mapping (for tests and labels)."""
    title: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    points: list[tuple[float, float, int, int]] = field(default_factory=list)  # (x, y, px, py)

    def to_pixel(self, x: float, y: float) -> tuple[int, int]:
        (x0, y0, x1, y1), (a, b), (c, d) = self.box, self.x_range, self.y_range
        return (round(x0 + (x - a) / (b - a) * (x1 - x0)), round(y1 - (y - c) / (d - c) * (y1 - y0)))


def collect_points(run_dir: Path, protocol: str) -> tuple[list[EvalPoint], list[str]]:
    """(points of ``protocol`` sorted by kimg, reasons for the metrics files left out)."""
    points, skipped = [], []
    for path in sorted(Path(run_dir).glob("eval/*/metrics.json")):
        m = json.loads(path.read_text())
        name = m.get("protocol", {}).get("name")
        if name != protocol:
            skipped.append(f"{path}: protocol {name or 'unrecorded (before --protocol)'}, not {protocol}")
            continue
        if m.get("kimg") is None:
            skipped.append(f"{path}: no kimg recorded")
            continue
        t = m.get("teacher") or {}
        points.append(EvalPoint(path.parent.name, float(m["kimg"]), m.get("step"), float(m["fid"]),
                                m.get("clip_score"), t.get("fid"), t.get("clip_score")))
    return sorted(points, key=lambda p: (p.kimg, p.name)), skipped


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    span = hi - lo
    raw = span / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _range(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.08 if hi > lo else max(abs(hi) * 0.05, 1e-3)
    return lo - pad, hi + pad


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def draw_panel(draw: ImageDraw.ImageDraw, font, origin: int, width: int, title: str,
               xs: list[float], ys: list[float | None], reference: float | None, ref_label: str) -> Panel:
    left, top, right, bottom = MARGIN
    box = (origin + left, top, origin + width - right, HEIGHT - bottom)
    known = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
    draw.text((origin + left, 12), title, fill=AXES, font=font)
    if not known:
        draw.rectangle(box, outline=AXES)
        draw.text((box[0] + 20, (box[1] + box[3]) // 2), "not evaluated (no --clip-weights)", fill=AXES, font=font)
        return Panel(title, box, (0.0, 1.0), (0.0, 1.0))
    y_values = [y for _, y in known] + ([reference] if reference is not None else [])
    panel = Panel(title, box, _range(xs), _range(y_values))
    for t in nice_ticks(*panel.y_range):
        _, py = panel.to_pixel(panel.x_range[0], t)
        draw.line((box[0], py, box[2], py), fill=GRID)
        draw.text((box[0] - 8, py), _fmt(t), fill=AXES, font=font, anchor="rm")
    for t in nice_ticks(*panel.x_range):
        px, _ = panel.to_pixel(t, panel.y_range[0])
        draw.line((px, box[1], px, box[3]), fill=GRID)
        draw.text((px, box[3] + 8), _fmt(t), fill=AXES, font=font, anchor="mt")
    draw.rectangle(box, outline=AXES)
    draw.text(((box[0] + box[2]) // 2, HEIGHT - 22), "kimg (thousands of images seen by the generator)",
              fill=AXES, font=font, anchor="mm")
    if reference is not None:
        _, py = panel.to_pixel(panel.x_range[0], reference)
        for x in range(box[0], box[2], 12):  # dashed
            draw.line((x, py, min(x + 6, box[2]), py), fill=TEACHER, width=2)
        draw.text((box[2] - 6, py - 4), ref_label, fill=TEACHER, font=font, anchor="rb")
    pixels = [panel.to_pixel(x, y) for x, y in known]
    if len(pixels) > 1:
        draw.line(pixels, fill=LINE, width=2)
    for (x, y), (px, py) in zip(known, pixels, strict=True):
        draw.ellipse((px - 4, py - 4, px + 4, py + 4), fill=LINE)
        panel.points.append((x, y, px, py))
    return panel


def plot_curves(points: list[EvalPoint], out: Path, title: str) -> list[Panel]:
    """Two panels, FID and CLIP score against kimg, saved as ``out`` (PNG). Returns the panels."""
    if not points:
        raise ValueError("no evaluated checkpoints to plot")
    img = Image.new("RGB", (WIDTH, HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=13)
    xs = [p.kimg for p in points]
    teacher = next((p for p in reversed(points) if p.teacher_fid is not None), None)
    half = WIDTH // 2
    panels = [
        draw_panel(draw, font, 0, half, f"FID ({title})", xs, [p.fid for p in points],
                   teacher.teacher_fid if teacher else None, "teacher"),
        draw_panel(draw, font, half, half, "CLIP score", xs, [p.clip_score for p in points],
                   teacher.teacher_clip if teacher else None, "teacher"),
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return panels


def plot_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fid_eval.py --plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plot", required=True, type=Path, metavar="RUN", help="run directory with eval/*/metrics.json")
    p.add_argument("--protocol", default=DEFAULT_PROTOCOL, choices=sorted(PROTOCOLS),
                   help="plot the evaluations made with this protocol (default %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="PNG path (default RUN/eval/curves.png)")
    args = p.parse_args(argv)
    points, skipped = collect_points(args.plot, args.protocol)
    for reason in skipped:
        log.warning("left out %s", reason)
    if not points:
        print(f"fid_eval --plot: error: no metrics.json of protocol {args.protocol} with kimg under "
              f"{args.plot}/eval/*/", file=sys.stderr)
        return 2
    out = args.out or Path(args.plot) / "eval" / "curves.png"
    plot_curves(points, out, args.protocol)
    for pt in points:
        print(f"{pt.name:>20}  kimg {pt.kimg:10.3f}  FID {pt.fid:8.3f}  CLIP "
              f"{'-' if pt.clip_score is None else f'{pt.clip_score:.4f}'}")
    print(f"wrote {out}")
    return 0
