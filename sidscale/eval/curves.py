"""FID and CLIP score against kimg for every evaluated checkpoint of a run: ``tools/fid_eval.py --plot RUN``.

Reads ``RUN/eval/*/metrics.json`` (what ``slurm/eval.sh`` and ``tools/fid_eval.py --out RUN/eval/NAME``
write), keeps those of one protocol, and draws two panels (FID, CLIP score) against kimg into one PNG
(default ``RUN/eval/curves.png``), with the teacher's numbers as a dashed line where they were
evaluated. Evaluations of different N (number of images) are separate series (own colour, named in the
title or the legend), never joined by a line: the FID of N images is biased by about 1/N. Drawn with PIL
(matplotlib is not a dependency).
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
SERIES = (LINE, (255, 127, 14), (44, 160, 44), (148, 103, 189), (140, 86, 75), (23, 190, 207))  # one per N
MIN_TICKS = 3


@dataclass
class EvalPoint:
    name: str  # RUN/eval/<name>
    kimg: float
    step: int | None
    fid: float
    clip_score: float | None
    teacher_fid: float | None = None
    teacher_clip: float | None = None
    num_images: int | None = None  # N of the evaluation (None: not recorded)


@dataclass
class Panel:
    """Where a panel's data landed: the plot box and the data -> pixel mapping (for tests and labels)."""
    title: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    points: list[tuple[float, float, int, int]] = field(default_factory=list)  # (x, y, px, py)
    x_ticks: list[tuple[float, str]] = field(default_factory=list)  # (value, label)
    y_ticks: list[tuple[float, str]] = field(default_factory=list)
    series: dict[int | None, list[tuple[float, float, int, int]]] = field(default_factory=dict)  # by N

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
        n = m.get("num_images")
        points.append(EvalPoint(path.parent.name, float(m["kimg"]), m.get("step"), float(m["fid"]),
                                m.get("clip_score"), t.get("fid"), t.get("clip_score"),
                                int(n) if n is not None else None))
    return sorted(points, key=lambda p: (p.kimg, p.name)), skipped


def tick_step(lo: float, hi: float, n: int = 5, minimum: int = MIN_TICKS) -> float:
    """A round step (1, 2, 5 x 10^k) giving about ``n`` ticks in [lo, hi], and never fewer than
    ``minimum`` (a span just above one step, e.g. 0.2953..0.3037 with step 0.005, would get one)."""
    raw = (hi - lo) / max(n - 1, 1)
    exp = math.floor(math.log10(raw))
    mantissas = (1, 2, 5)
    k = next(i for i, m in enumerate((*mantissas, 10)) if m * 10.0 ** exp >= raw)
    k, exp = (0, exp + 1) if k == 3 else (k, exp)
    while True:
        step = mantissas[k] * 10.0 ** exp
        if math.floor(hi / step + 1e-9) - math.ceil(lo / step - 1e-9) + 1 >= minimum:
            return step
        k, exp = (k - 1, exp) if k > 0 else (2, exp - 1)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]: about ``n``, at least ``MIN_TICKS``."""
    step = tick_step(lo, hi, n)
    return [k * step for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]


def tick_label(value: float, step: float) -> str:
    """``value`` with as many decimals as ``step`` needs, so neighbouring ticks never read the same."""
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{value:.{decimals}f}"


def _range(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.08 if hi > lo else max(abs(hi) * 0.05, 1e-3)
    return lo - pad, hi + pad


def n_label(n: int | None) -> str:
    return f"N = {n}" if n is not None else "N unrecorded"


def draw_panel(draw: ImageDraw.ImageDraw, font, origin: int, width: int, title: str,
               xs: list[float], ys: list[float | None], reference: float | None, ref_label: str,
               ns: list[int | None] | None = None) -> Panel:
    """``ns``: each point's N; points of one N form one series (a line of its own colour), and the N
    is in the title (one N) or the legend (several)."""
    left, top, right, bottom = MARGIN
    box = (origin + left, top, origin + width - right, HEIGHT - bottom)
    ns = ns if ns is not None else [None] * len(xs)
    known = [(x, y, n) for x, y, n in zip(xs, ys, ns, strict=True) if y is not None]
    groups = list(dict.fromkeys(n for _, _, n in known))
    if len(groups) == 1:
        title = f"{title}, {n_label(groups[0])}"
    draw.text((origin + left, 12), title, fill=AXES, font=font)
    if not known:
        draw.rectangle(box, outline=AXES)
        draw.text((box[0] + 20, (box[1] + box[3]) // 2), "not evaluated (no --clip-weights)", fill=AXES, font=font)
        return Panel(title, box, (0.0, 1.0), (0.0, 1.0))
    y_values = [y for _, y, _ in known] + ([reference] if reference is not None else [])
    panel = Panel(title, box, _range(xs), _range(y_values))
    step = tick_step(*panel.y_range)
    for t in nice_ticks(*panel.y_range):
        _, py = panel.to_pixel(panel.x_range[0], t)
        draw.line((box[0], py, box[2], py), fill=GRID)
        panel.y_ticks.append((t, tick_label(t, step)))
        draw.text((box[0] - 8, py), panel.y_ticks[-1][1], fill=AXES, font=font, anchor="rm")
    step = tick_step(*panel.x_range)
    for t in nice_ticks(*panel.x_range):
        px, _ = panel.to_pixel(t, panel.y_range[0])
        draw.line((px, box[1], px, box[3]), fill=GRID)
        panel.x_ticks.append((t, tick_label(t, step)))
        draw.text((px, box[3] + 8), panel.x_ticks[-1][1], fill=AXES, font=font, anchor="mt")
    draw.rectangle(box, outline=AXES)
    draw.text(((box[0] + box[2]) // 2, HEIGHT - 22), "kimg (thousands of images seen by the generator)",
              fill=AXES, font=font, anchor="mm")
    if reference is not None:
        _, py = panel.to_pixel(panel.x_range[0], reference)
        for x in range(box[0], box[2], 12):  # dashed
            draw.line((x, py, min(x + 6, box[2]), py), fill=TEACHER, width=2)
        draw.text((box[2] - 6, py - 4), ref_label, fill=TEACHER, font=font, anchor="rb")
    for g, n in enumerate(groups):
        colour = SERIES[g % len(SERIES)]
        series = [(x, y, *panel.to_pixel(x, y)) for x, y, m in known if m == n]
        if len(series) > 1:
            draw.line([(px, py) for _, _, px, py in series], fill=colour, width=2)
        for _, _, px, py in series:
            draw.ellipse((px - 4, py - 4, px + 4, py + 4), fill=colour)
        panel.series[n] = series
        if len(groups) > 1:  # legend, top left inside the box
            ly = box[1] + 8 + 16 * g
            draw.line((box[0] + 8, ly, box[0] + 24, ly), fill=colour, width=2)
            draw.text((box[0] + 30, ly), n_label(n), fill=AXES, font=font, anchor="lm")
    panel.points.extend((x, y, *panel.to_pixel(x, y)) for x, y, _ in known)
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
    ns = [p.num_images for p in points]
    ref_label = f"teacher ({n_label(teacher.num_images)})" if teacher else ""
    panels = [
        draw_panel(draw, font, 0, half, f"FID ({title})", xs, [p.fid for p in points],
                   teacher.teacher_fid if teacher else None, ref_label, ns),
        draw_panel(draw, font, half, half, "CLIP score", xs, [p.clip_score for p in points],
                   teacher.teacher_clip if teacher else None, ref_label, ns),
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
        print(f"{pt.name:>20}  kimg {pt.kimg:10.3f}  {n_label(pt.num_images):>12}  FID {pt.fid:8.3f}  CLIP "
              f"{'-' if pt.clip_score is None else f'{pt.clip_score:.4f}'}")
    print(f"wrote {out}")
    return 0
