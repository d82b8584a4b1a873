"""What a person sees: run a command in a pseudo-terminal of a fixed size and render its output as a
terminal would show it (carriage returns overwrite, cursor-up, erase-line, auto-wrap at the width).

Not a full VT100: enough for tqdm bars, logging lines and warnings, which is all a run prints.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COLS, ROWS = 100, 40
_CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")


def run_in_pty(argv: list[str], cols: int = COLS, rows: int = ROWS, env: dict | None = None,
               cwd: Path | None = None, timeout_s: float = 900.0) -> tuple[int, str]:
    """(exit code, raw output) of ``argv`` with stdin/stdout/stderr on a ``cols`` x ``rows`` pty.
    ``timeout_s`` only guards against a hang (the process is killed and the test fails)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = dict(os.environ if env is None else env, COLUMNS=str(cols), LINES=str(rows), TERM="xterm")
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd or REPO,
                            close_fds=True, start_new_session=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout_s
    try:
        while True:
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"{argv} still running after {timeout_s} s")
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer of the pty has closed it
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    return proc.wait(), b"".join(chunks).decode("utf-8", "replace")


def python_in_pty(code: str, cols: int = COLS, **kwargs) -> tuple[int, str]:
    """``code`` run by this interpreter in a pty, with the repository first on the path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return run_in_pty([sys.executable, "-c", code], cols=cols, env=env, **kwargs)


def render(raw: str, cols: int = COLS) -> list[str]:
    """The lines a terminal ``cols`` wide shows after receiving ``raw`` (scrollback included)."""
    lines: list[list[str]] = [[]]
    row = col = 0
    pos = 0

    def put(ch: str) -> None:
        nonlocal row, col
        if col >= cols:  # deferred auto-wrap, as xterm: the cursor waits at the margin
            row, col = row + 1, 0
        while len(lines) <= row:
            lines.append([])
        line = lines[row]
        line.extend(" " * (col + 1 - len(line)))
        line[col] = ch
        col += 1

    while pos < len(raw):
        ch = raw[pos]
        if ch == "\x1b":
            m = _CSI.match(raw, pos)
            if m:
                n = int(m.group(1) or 1) if m.group(1).isdigit() else 1
                kind = m.group(2)
                if kind == "A":
                    row = max(0, row - n)
                elif kind == "B":
                    row += n
                elif kind == "C":
                    col = min(cols, col + n)
                elif kind == "D":
                    col = max(0, col - n)
                elif kind == "G":
                    col = max(0, n - 1)
                elif kind == "K":  # erase to the end of the line (tqdm's clear uses it on some terminals)
                    while len(lines) <= row:
                        lines.append([])
                    del lines[row][col:]
                pos = m.end()
                continue
            pos += 1
            continue
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row += 1
            while len(lines) <= row:
                lines.append([])
        elif ch == "\b":
            col = max(0, col - 1)
        elif ch >= " ":
            put(ch)
        pos += 1
    out = ["".join(line).rstrip() for line in lines]
    while out and not out[-1]:
        out.pop()
    return out


def frames(raw: str) -> list[str]:
    """Every state a line was drawn in (the text between carriage returns / newlines), in order: a
    progress bar's successive redraws."""
    return [f.strip() for f in re.split(r"[\r\n]+", _CSI.sub("", raw)) if f.strip()]
