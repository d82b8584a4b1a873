"""The GPU check: the real entry points end to end on the GPUs present, one JSON of every step's result.

    bash tools/gpu_check.sh --out DIR --part main   # a lent 1-GPU machine, call 1 (<= 8 min): steps 1-8 below
    bash tools/gpu_check.sh --out DIR --part big    # call 2: steps 9 on flux_dev_4l / sd35_large_4l, then NCCL
                                                    # and the CUDA tests
    bash tools/gpu_check.sh --dry-run --out DIR     # HERE, before: the GPU machine's start rehearsed (DryRun)
    bash tools/gpu_check.sh                 # on a GPU machine: SD1.5-size, NCCL, all visible GPUs (<10 min, 1 H100)
    bash tools/gpu_check.sh --cpu-smoke     # the same sequence on the CPU (tiny preset, gloo, 2 ranks, ~2 min)

``--out DIR`` (a folder: a lent machine's $OUT) gets, per part, ``<prefix>_<part>.json``, ONE log
``<prefix>_<part>.log`` with every step's log, and for the main part the preview and the sample PNGs: at
most 8 files for main + big + dry run. With ``--part`` the steps share a time budget (``--budget-s``,
450 s): a step gets at most what is left, none starts with under 20 s left, so the JSON and the logs are
written before the call's hard limit.
    bash tools/gpu_check.sh --preset sd35_medium              # train SD3.5-Medium; bench + plan sd15 and it
    bash tools/gpu_check.sh --cpu-smoke --preset sd3_tiny     # the SD3 path on the CPU (SD3.5-shaped, 256 px)

Steps, in order (each a separate process, as a user would start it):

1. ``environment``: torch / CUDA / NCCL / DeepSpeed versions, the GPUs, DeepSpeed's accelerator
   (must be cuda in GPU mode: DS_ACCELERATOR is unset for every child), free disk.
2. ``write_teacher``: tools/write_random_teacher.py writes a random-weight teacher of the preset
   (default SD1.5's UNet, CLIP-L text encoder, VAE; ``--preset sd35_medium``: the SD3 pipeline
   layout with CLIP-L, CLIP-G and T5-XXL; bf16 safetensors) to a work directory, so the trainer
   loads it through its real loading path (its family's ``load_teacher``), with the config preset
   that fits it (random_teacher.json's ``config``: sd15, sdxl, sd3_medium, sd35_medium, ...).
3. ``disk_space``: the work directory holds one checkpoint (~27 GB at SD1.5 size, ~74 GB at
   SD3.5-Medium size: two ZeRO engines with fp32 masters and Adam states, plus the fp32 EMA) and the
   export (the fp32 generator plus a copy of the teacher's encoders and VAE: T5-XXL is 8.9 GiB).
4. ``train_checkpoint_kill``: ``torchrun sidscale/train.py`` (``main()``; NCCL on GPUs, gloo on the
   CPU) for 4 steps with a checkpoint every 2, the fault hook set to hang after step 3
   (``SIDSCALE_FAULT=point=after_step,step=3,action=hang``); once every rank reports it is there,
   the whole launch is SIGKILLed; the newest complete checkpoint must be step 2.
5. ``resume_train_export``: the same command again: it must say ``resumed from .../step_00000002
   (step 2)``, train steps 3-4 (a preview at step 4), save step 4 and export the EMA generator.
   Once the step-4 save has started (all ranks are past the resume) the driver deletes the step-2
   checkpoint, so that two SD1.5-size checkpoints never coexist on a 64 GB disk.
6. ``sample``: ``python -m sidscale.sample`` from the export, one image.
7. ``bench_<preset>``: tools/bench.py, our default setting (ZeRO-2, bf16, gradient checkpointing as
   the preset's config has it) against the reference setting (fp32 PyTorch loop, TF32 off,
   micro-batch 1), one process on one GPU. A micro-batch the memory plan says does not fit is
   lowered; if none fits, the step is skipped. The presets: ``--bench-presets``, default sd15
   (tiny with --cpu-smoke), plus ``--preset`` when given.
8. ``memory_plan_<preset>``: tools/memory_plan.py --measure: the plan's peak against the measured
   peak of the real trainer; passes within ``--plan-tolerance``.
9. ``big_plan_<preset>`` / ``big_measure_<preset>`` (only with ``--big-preset sd35_large|flux_dev``, for a
   machine with enough GPU memory for it, e.g. 8 or 16 x 80 GB): tools/scaling_model.py --memory picks the
   cheapest setting the plan says fits this machine (ZeRO stage, teacher placement, checkpointing, largest
   micro-batch, previews off), then ``torchrun tools/memory_plan.py --measure`` on every GPU measures the real
   trainer's peak there (random weights, built by the benchmark) against the prediction, within
   ``--plan-tolerance``. Skipped with the reason when the setting needs text encoders off the GPU (the measured
   trainer keeps them on every rank) or the preset is not in ``preset_nets`` yet:

       bash tools/gpu_check.sh --only big --big-preset sd35_large    # 8 x 80 GB: ~10 min
       bash tools/gpu_check.sh --cpu-smoke --only big --big-preset sd3_tiny   # the same steps on the CPU (~1 min)

Writes bench/results/gpu_check_<host>_<date>.json (``gpu_check_cpu-smoke_...`` for the smoke run)
after every step: {"host", "date", "mode", "ok", "seconds", "settings", "steps": [{"name", "status":
pass|fail|skipped, "seconds", "reason", numbers..., "log_tail" on failure}]}. Exits 1 if any step
failed (the JSON is written all the same), 0 otherwise. Each step has a time limit; a step that
hangs is killed with its whole process tree.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sidscale.testing.processes import is_gone, process_tree  # noqa: E402

GIB = 2**30
MAX_STEPS, CKPT_EVERY, KILL_AFTER_STEP = 4, 2, 3
MIN_STEP_S = 20  # a step is not started with less of the part's time budget left
# --part: what one call of a lent GPU machine (<= 8 minutes) runs, the most informative first
PARTS = ("main", "big", "all")
# --part big without --big-preset: FLUX.1-dev and SD3.5-Large at their real width, tokens and text encoders,
# cut to a few blocks (sidscale/families/presets.py SLICES) so that the whole training setting fits one GPU
DEFAULT_BIG_PRESETS = ["flux_dev_4l", "sd35_large_4l"]
PART_BUDGET_S = 450.0  # --budget-s default with --part main|big: 8 minutes less the start-up and the copy back
DRY_RUN_SETUP_S = 150.0  # --dry-run: the venv, the install and the imports, before the part's own budget
FAULT = f"point=after_step,step={KILL_AFTER_STEP},action=hang"
RESUMED_RE = re.compile(r"resumed from (\S+) \(step (\d+)\)")
LOSS_RE = re.compile(r"fake=([-+0-9.einfa]+), gen=([-+0-9.einfa]+)")


@dataclass(frozen=True)
class Mode:
    """What differs between the GPU check and its CPU smoke run: sizes, device, time limits. The
    sequence of steps and their checks are the same."""

    name: str
    device: str  # cuda | cpu
    train_preset: str  # the architecture trained end to end
    text_layers: int | None  # None: the preset's text encoder(s) at full depth
    micro_batch: int
    accumulation: int  # micro-batches per rank per step (>1 exercises gradient accumulation)
    bench_micro_batch: int
    num_workers: int  # prompt-stream DataLoader workers per rank
    timeouts: dict[str, float] = field(default_factory=dict)

    def timeout(self, step: str) -> float:
        return self.timeouts.get(step, self.timeouts.get("default", 600.0))


GPU_MODE = Mode("gpu", "cuda", "sd15", None, micro_batch=2, accumulation=2, bench_micro_batch=4, num_workers=2,
                timeouts={"environment": 180, "comm_check": 120, "gpu_tests": 180, "write_teacher": 400,
                          "train_checkpoint_kill": 600, "resume_train_export": 600, "sample": 300, "bench": 480,
                          "memory_plan": 360, "big_measure": 900})
SMOKE_MODE = Mode("cpu-smoke", "cpu", "tiny", None, micro_batch=2, accumulation=2, bench_micro_batch=2,
                  num_workers=1, timeouts={"default": 300})


# ------------------------------------------------------------------------------------------ processes
class Launch:
    """One command in a session of its own (a kill never reaches this driver), output to a log file."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path):
        self.cmd, self.log = cmd, log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(log, "w")  # noqa: SIM115 (closed in wait/kill)
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                     start_new_session=True)
        self.t0 = time.monotonic()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None after killing the launch at ``timeout`` seconds."""
        try:
            return self.proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        except BaseException:  # interrupted (Ctrl-C, SIGTERM): take the launch down with us
            self.kill()
            raise
        finally:
            self._out.close()

    def kill(self) -> list[int]:
        """SIGKILL every process of the launch at once (a node failure, the OOM killer). NOTE: torchrun
        starts its workers in sessions of their own, so each process group of the tree is killed.
        Returns the pids that survived 30 s."""
        tree = process_tree(self.proc.pid)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        self._out.close()
        deadline = time.monotonic() + 30
        while (alive := [pid for pid in tree if not is_gone(pid)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        return alive

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.t0


def run(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> tuple[int | None, str, float]:
    launch = Launch(cmd, env, log)
    code = launch.wait(timeout)
    return code, launch.output(), launch.seconds


def json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def tail(text: str, n: int = 4000) -> str:
    return text[-n:]


def gather_logs(logs: Path, dest: Path, per_log: int = 2_000_000) -> None:
    """Every step's log, oldest first, in ONE file (a lent machine returns at most 8 files): each under a
    header with its name; a log over ``per_log`` characters keeps its end."""
    parts = [] if logs.is_dir() and any(logs.glob("*.log")) else ["(no step wrote a log)\n"]
    for log in sorted(logs.glob("*.log"), key=lambda f: f.stat().st_mtime):
        text = log.read_text(errors="replace")
        cut = f"[... {len(text) - per_log} characters cut ...]\n" if len(text) > per_log else ""
        parts.append(f"===== {log.name} =====\n{cut}{text[-per_log:]}\n")
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_text("".join(parts))
    tmp.replace(dest)


def logged_scalars(tb_dir: Path) -> dict[str, Any]:
    """The trainer's own TensorBoard scalars at the last logged step (loss, images/s, peak memory, NaN drops)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
        acc.Reload()
        out: dict[str, Any] = {}
        for tag in acc.Tags().get("scalars", []):
            events = acc.Scalars(tag)
            if events:
                out[tag] = {"step": events[-1].step, "value": events[-1].value}
        return out
    except Exception as e:  # numbers for the record only: never fails the step
        return {"error": f"{type(e).__name__}: {e}"}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


# ------------------------------------------------------------------------------------------ the check
class StepFailed(Exception):
    def __init__(self, reason: str, **numbers: Any):
        super().__init__(reason)
        self.numbers = numbers


class Skip(Exception):
    pass


class Check:
    def __init__(self, mode: Mode, out: Path, workdir: Path, nproc: int | None, bench_presets: list[str],
                 plan_tolerance: float, only: set[str] | None, part: str = "all", budget_s: float | None = None,
                 results_dir: Path | None = None):
        self.mode, self.out, self.work = mode, out, workdir
        self.nproc_arg, self.bench_presets, self.tol, self.only = nproc, bench_presets, plan_tolerance, only
        self.part, self.budget_s, self.results_dir = part, budget_s, results_dir
        self.started = time.monotonic()
        self.record: dict[str, Any] = {
            "host": socket.gethostname(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "mode": mode.name,
            "ok": None, "seconds": None, "workdir": str(workdir), "part": part, "budget_s": budget_s,
            "settings": {"train_preset": mode.train_preset, "micro_batch": mode.micro_batch,
                         "accumulation": mode.accumulation, "max_steps": MAX_STEPS, "ckpt_every": CKPT_EVERY,
                         "fault": FAULT, "bench_presets": bench_presets, "bench_micro_batch": mode.bench_micro_batch,
                         "plan_tolerance": plan_tolerance},
            "steps": [],
        }
        self.results: dict[str, str] = {}
        self.env_info: dict[str, Any] = {}
        self.teacher_info: dict[str, Any] = {}
        self.teacher_dir = workdir / "teacher"
        self.run_dir = workdir / "run"
        self.logs = workdir / "logs"
        self.big_presets: list[str] = []  # --big-preset
        self.train_set: list[str] = []  # --train-set: more trainer overrides (e.g. ZeRO-3 on 2 GPUs)
        self.big_settings: dict[str, dict] = {}

    # ---------------------------------------------------------------- plumbing
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("SIDSCALE_FAULT", None)
        env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
        if self.mode.device == "cpu":
            env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        else:
            # NOTE: a DS_ACCELERATOR=cpu left in the shell would silently run the "GPU" check on the CPU.
            env.pop("DS_ACCELERATOR", None)
        return env

    @property
    def nproc(self) -> int:
        if self.nproc_arg:
            return self.nproc_arg
        if self.mode.device == "cpu":
            return 2
        return max(1, int(self.env_info.get("cuda_device_count") or 1))

    def timeout(self, step: str) -> float:
        """The step's own limit, cut to what is left of the part's time budget (``--budget-s``): a call
        with a hard limit (a lent GPU machine's 8 minutes) still ends with its JSON and logs written."""
        limit = self.mode.timeout(step)
        if self.budget_s is None:
            return limit
        return max(1.0, min(limit, self.budget_s - (time.monotonic() - self.started)))

    def budget_left(self) -> float:
        return float("inf") if self.budget_s is None else self.budget_s - (time.monotonic() - self.started)

    def save(self) -> None:
        self.record["seconds"] = round(time.monotonic() - self.started, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.record, indent=1, default=str))
        tmp.replace(self.out)
        if self.results_dir is not None:
            gather_logs(self.logs, self.out.with_suffix(".log"))

    def step(self, name: str, fn: Callable[[], dict[str, Any]], needs: tuple[str, ...] = ()) -> None:
        # NOTE: the environment always runs (the other steps read the device count and memory from it).
        selected = (self.only is None or name == "environment" or name in self.only
                    or name.split("_")[0] in self.only)
        if not selected:
            return
        entry: dict[str, Any] = {"name": name}
        t0 = time.monotonic()
        # A dependency left out with --only is taken as done (e.g. a resume in a kept --workdir).
        missing = [n for n in needs if n in self.results and self.results[n] != "pass"]
        try:
            if missing:
                raise Skip(f"needs {', '.join(missing)}, which did not pass")
            if self.budget_left() < MIN_STEP_S:
                raise Skip(f"the part's time budget (--budget-s {self.budget_s:g}) is spent")
            entry.update(fn() or {})
            entry["status"] = "pass"
        except Skip as e:
            entry.update(status="skipped", reason=str(e))
        except StepFailed as e:
            entry.update(e.numbers)
            entry.update(status="fail", reason=str(e))
        except Exception as e:  # a bug or an unexpected state: recorded as this step's failure
            entry.update(status="fail", reason=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
        if entry["status"] == "fail" and self.budget_left() < 2.0:
            # the part's budget ran out under this step (its time limit was what was left): not measured,
            # which is not a failure of the code under test
            entry.update(status="skipped", reason=f"cut by the part's time budget (--budget-s {self.budget_s:g}): "
                                                  f"{entry['reason']}")
        entry["seconds"] = round(time.monotonic() - t0, 1)
        self.results[name] = entry["status"]
        self.record["steps"].append(entry)
        self.save()
        reason = f": {entry['reason']}" if entry.get("reason") else ""
        print(f"gpu_check: {name}: {entry['status']} ({entry['seconds']:.0f} s){reason}", flush=True)

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    # ---------------------------------------------------------------- 1. environment
    def environment(self) -> dict[str, Any]:
        probe = r"""
import importlib.util, json, os, shutil, sys
import torch
out = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
       "cuda_available": torch.cuda.is_available(), "cuda_device_count": torch.cuda.device_count(),
       "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR"), "cpu_count": os.cpu_count()}
if out["cuda_available"]:
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    out["gpus"] = [{"name": p.name, "total_gib": round(p.total_memory / 2**30, 2),
                    "capability": f"{p.major}.{p.minor}"} for p in props]
    out["gpu_mem_gib"] = min(p.total_memory for p in props) / 2**30
    try:
        v = torch.cuda.nccl.version()
        out["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception as e:
        out["nccl"] = f"unknown ({type(e).__name__}: {e})"
    out["bf16_supported"] = torch.cuda.is_bf16_supported()
for name in ("deepspeed", "diffusers", "transformers", "webdataset", "safetensors"):
    try:
        out[name] = __import__(name).__version__
    except Exception as e:
        out[name] = f"missing ({type(e).__name__}: {e})"
out["open_clip_vocab"] = importlib.util.find_spec("open_clip") is not None
from deepspeed.accelerator import get_accelerator
out["ds_accelerator"] = get_accelerator().device_name()
print(json.dumps(out))
"""
        code, text, _ = run(self.python("-c", probe), self.env(), self.logs / "environment.log",
                            self.timeout("environment"))
        lines = json_lines(text)
        if code != 0 or not lines:
            raise StepFailed(f"the environment probe failed (exit {code})", log_tail=tail(text))
        info = lines[-1]
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
            smi = subprocess.run(query, capture_output=True, text=True, timeout=30)
            info["nvidia_smi"] = smi.stdout.strip().splitlines()
        info["disk_free_gib"] = round(shutil.disk_usage(self.work).free / GIB, 1)
        self.env_info = info
        self.record["environment"] = info
        missing = [k for k in ("deepspeed", "diffusers", "transformers", "webdataset")
                   if str(info.get(k, "")).startswith("missing")]
        if missing:
            raise StepFailed(f"missing Python packages: {', '.join(missing)}")
        if not info["open_clip_vocab"]:
            raise StepFailed("open_clip_torch is not installed (it ships the CLIP BPE vocabulary the tokenizer needs)")
        if self.mode.device == "cuda":
            if not info["cuda_available"] or info["cuda_device_count"] < 1:
                raise StepFailed("no CUDA device visible to torch (GPU mode; use --cpu-smoke on a CPU machine)")
            if info["ds_accelerator"] != "cuda":
                raise StepFailed(f"DeepSpeed's accelerator is {info['ds_accelerator']!r}, expected 'cuda'")
        elif info["ds_accelerator"] != "cpu":
            raise StepFailed(f"DeepSpeed's accelerator is {info['ds_accelerator']!r}, expected 'cpu' "
                             "(DS_ACCELERATOR=cpu)")
        return {"gpus": info.get("gpus"), "ranks": self.nproc}

    # ---------------------------------------------------------------- 2-3. teacher and disk
    def write_teacher(self) -> dict[str, Any]:
        from sidscale.testing.random_teacher import read_info

        cmd = self.python("tools/write_random_teacher.py", "--preset", self.mode.train_preset, "--out",
                          str(self.teacher_dir), "--dtype", "bf16")
        if self.mode.text_layers is not None:
            cmd += ["--text-layers", str(self.mode.text_layers)]
        code, text, _ = run(cmd, self.env(), self.logs / "write_teacher.log", self.timeout("write_teacher"))
        if code != 0:
            raise StepFailed(f"tools/write_random_teacher.py exited {code}", log_tail=tail(text))
        self.teacher_info = read_info(self.teacher_dir)
        return {"teacher": self.teacher_info}

    def teacher(self) -> dict[str, Any]:
        """The teacher's random_teacher.json (written by this run, or by an earlier one in --workdir)."""
        if not self.teacher_info:
            from sidscale.testing.random_teacher import read_info

            self.teacher_info = read_info(self.teacher_dir)
        return self.teacher_info

    def net_sizes(self) -> tuple[int, int]:
        """(parameters, floating-point buffer elements) of the teacher's denoiser (UNet or SD3 transformer)."""
        info = self.teacher()
        network = info.get("network", "unet")  # directories written before SD3 support: a UNet
        return int(info["parameters"][network]), int(info.get("buffers", {}).get(network, 0))

    def checkpoint_bytes(self) -> int:
        """One checkpoint of the bf16 run: per engine the bf16 module (2P) plus its buffers, kept in fp32
        (SD3's pos_embed table: 4B), the fp32 master and Adam's two moments (12P); plus the fp32 EMA
        (4P). Checked against the real one in the resume step."""
        p, b = self.net_sizes()
        return 2 * ((2 + 12) * p + 4 * b) + 4 * p

    def export_bytes(self) -> int:
        """The export: the fp32 generator (with its buffers) and a copy of the teacher's frozen folders
        (text encoders, tokenizers, VAE, scheduler: everything of the teacher but its denoiser)."""
        p, b = self.net_sizes()
        network = self.teacher().get("network", "unet")
        frozen = dir_bytes(self.teacher_dir) - dir_bytes(self.teacher_dir / network)
        return 4 * (p + b) + frozen

    def disk_space(self) -> dict[str, Any]:
        # one checkpoint at a time (the driver deletes step 2 once step 4's save starts), the export,
        # the prompt shards / logs / preview (1 GiB)
        need = int(1.1 * self.checkpoint_bytes()) + self.export_bytes() + GIB
        free = shutil.disk_usage(self.work).free
        numbers = {"need_gib": round(need / GIB, 1), "free_gib": round(free / GIB, 1),
                   "checkpoint_gib_estimate": round(self.checkpoint_bytes() / GIB, 2),
                   "export_gib_estimate": round(self.export_bytes() / GIB, 2)}
        if free < need:
            raise StepFailed(f"{self.work} has {free / GIB:.1f} GiB free, the run needs ~{need / GIB:.1f} GiB "
                             "(one checkpoint + the export): give --workdir (or GPU_CHECK_WORKDIR) on a larger disk",
                             **numbers)
        return numbers

    # ---------------------------------------------------------------- 4-5. the trainer
    def train_cmd(self) -> list[str]:
        from sidscale.config import list_presets
        from sidscale.distributed.runtime import free_port

        info, m = self.teacher(), self.mode
        # random_teacher.json names the config preset that fits the architecture (older ones do not)
        config = info.get("config") or (info["preset"] if info["preset"] in list_presets()
                                        else ("sdxl" if info["kind"] == "sdxl" else "sd15"))
        overrides = [
            f"teacher.path={self.teacher_dir}", f"teacher.kind={info['kind']}",
            f"teacher.resolution={info['resolution']}",
            "teacher.dtype=bf16", "train.precision=bf16", f"train.micro_batch={m.micro_batch}",
            f"train.global_batch={m.micro_batch * m.accumulation * self.nproc}", f"train.max_steps={MAX_STEPS}",
            f"train.ckpt_every={CKPT_EVERY}", "train.log_every=1", f"train.preview_every={MAX_STEPS}",
            "train.keep_last=1", "train.export_at_end=true", "data.shards=toy", f"data.num_workers={m.num_workers}",
            "preview.seeds_per_prompt=1", "eval.num_samples=0", *self.train_set,
        ]
        cmd = self.python("-m", "torch.distributed.run", f"--nproc_per_node={self.nproc}",
                          f"--master_port={free_port()}", "sidscale/train.py", "--config", config,
                          "--run-dir", str(self.run_dir))
        return cmd + [a for o in overrides for a in ("--set", o)]

    def train_checkpoint_kill(self) -> dict[str, Any]:
        from sidscale.checkpointing import files as ckpt_lib

        fault_dir = self.work / "fault"
        shutil.rmtree(fault_dir, ignore_errors=True)
        env = dict(self.env(), SIDSCALE_FAULT=FAULT, SIDSCALE_FAULT_DIR=str(fault_dir))
        launch = Launch(self.train_cmd(), env, self.logs / "train_checkpoint_kill.log")
        markers = [fault_dir / f"reached_rank{r}" for r in range(self.nproc)]
        deadline = launch.t0 + self.timeout("train_checkpoint_kill")
        try:
            while not all(m.is_file() for m in markers):
                if not launch.running():
                    code = launch.wait(10)
                    raise StepFailed(f"the trainer exited ({code}) before reaching the fault point after step "
                                     f"{KILL_AFTER_STEP}", log_tail=tail(launch.output()))
                if time.monotonic() > deadline:
                    raise StepFailed(f"timeout: no rank reached the fault point after step {KILL_AFTER_STEP}",
                                     log_tail=tail(launch.output()))
                time.sleep(0.2)
            reached_s = launch.seconds
        finally:
            survivors = launch.kill()
        if survivors:
            raise StepFailed(f"processes {survivors} survived SIGKILL", log_tail=tail(launch.output()))
        latest = ckpt_lib.find_resume_checkpoint(self.run_dir)
        expected = ckpt_lib.step_dir(self.run_dir, CKPT_EVERY)
        numbers = {"seconds_to_fault_point": round(reached_s, 1), "ranks": self.nproc,
                   "checkpoint": str(latest), "checkpoint_gib": round(dir_bytes(expected) / GIB, 2)}
        if latest != expected or not ckpt_lib.is_complete(expected):
            raise StepFailed(f"after the kill the resume point is {latest}, expected the complete {expected}",
                             log_tail=tail(launch.output()), **numbers)
        return numbers

    def resume_train_export(self) -> dict[str, Any]:
        from sidscale.checkpointing import files as ckpt_lib
        from sidscale.export import read_export_meta

        old, final = ckpt_lib.step_dir(self.run_dir, CKPT_EVERY), ckpt_lib.step_dir(self.run_dir, MAX_STEPS)
        old_bytes = dir_bytes(old)
        launch = Launch(self.train_cmd(), self.env(), self.logs / "resume_train_export.log")
        deadline = launch.t0 + self.timeout("resume_train_export")
        freed_at = None
        try:
            while launch.running():
                # NOTE: the step-4 save starts after steps 3 and 4, whose collectives every rank joins only
                # after its resume: from then on no rank reads step 2.
                if freed_at is None and final.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
                    freed_at = round(launch.seconds, 1)
                if time.monotonic() > deadline:
                    raise StepFailed("timeout: the resumed run did not finish", log_tail=tail(launch.output()))
                time.sleep(0.2)
            code = launch.wait(10)
        finally:
            if launch.running():
                launch.kill()
        text = launch.output()
        m = RESUMED_RE.search(text)
        losses = LOSS_RE.findall(text)
        numbers: dict[str, Any] = {
            "exit_code": code, "resumed_from": m.group(1) if m else None,
            "resumed_step": int(m.group(2)) if m else None, "seconds": round(launch.seconds, 1),
            "freed_step2_checkpoint_at_s": freed_at, "last_losses": {"fake": losses[-1][0], "gen": losses[-1][1]}
            if losses else None,
        }
        if code != 0:
            raise StepFailed(f"the resumed run exited {code}", log_tail=tail(text), **numbers)
        if numbers["resumed_step"] != CKPT_EVERY:
            raise StepFailed(f"the run resumed from step {numbers['resumed_step']}, expected {CKPT_EVERY}",
                             log_tail=tail(text), **numbers)
        if not ckpt_lib.is_complete(final) or ckpt_lib.find_resume_checkpoint(self.run_dir) != final:
            raise StepFailed(f"no complete final checkpoint {final}", log_tail=tail(text), **numbers)
        numbers["checkpoint_gib"] = round(dir_bytes(final) / GIB, 3)
        numbers["checkpoint_over_estimate"] = round(dir_bytes(final) / self.checkpoint_bytes(), 3)
        numbers["step2_checkpoint_gib"] = round(old_bytes / GIB, 3)
        meta = read_export_meta(self.run_dir / "export")
        numbers["export"] = {"step": meta.get("step"), "gib": round(dir_bytes(self.run_dir / "export") / GIB, 2)}
        if meta.get("step") != MAX_STEPS:
            raise StepFailed(f"the export is of step {meta.get('step')}, expected {MAX_STEPS}", **numbers)
        preview = self.run_dir / "samples" / f"step_{MAX_STEPS:08d}.png"
        if not preview.is_file():
            raise StepFailed(f"no preview image {preview}", **numbers)
        numbers["logged"] = logged = logged_scalars(self.run_dir / "tb")
        dropped = {k: v["value"] for k, v in logged.items() if k.startswith("nan/") and v["value"] > 0}
        if dropped:  # recorded, not failed: the guards dropped non-finite samples at the last logged step
            numbers["warnings"] = [f"non-finite samples dropped: {dropped}"]
        return numbers

    # ---------------------------------------------------------------- 6. sampling
    def sample(self) -> dict[str, Any]:
        out = self.work / "sample.png"
        cmd = self.python("-m", "sidscale.sample", "--model", str(self.run_dir / "export"), "--prompt",
                          "a photo of an astronaut riding a horse on the moon", "--seed", "0", "--out", str(out),
                          "--device", self.mode.device)
        code, text, seconds = run(cmd, self.env(), self.logs / "sample.log", self.timeout("sample"))
        if code != 0 or not out.is_file():
            raise StepFailed(f"python -m sidscale.sample exited {code}", log_tail=tail(text))
        from PIL import Image, ImageStat

        image = Image.open(out).convert("RGB")
        stat = ImageStat.Stat(image)
        numbers = {"image_size": list(image.size), "pixel_mean": [round(v, 2) for v in stat.mean],
                   "pixel_std": [round(v, 2) for v in stat.stddev], "seconds_incl_start": round(seconds, 1)}
        if max(stat.stddev) == 0:  # NaN latents become one flat colour through the uint8 conversion
            raise StepFailed("the sample is a single flat colour (non-finite latents?)", **numbers)
        return numbers

    # ---------------------------------------------------------------- 7-8. benchmark and memory plan
    def gpu_mem_gib(self) -> float:
        return float(self.env_info.get("gpu_mem_gib") or 16.0)

    def plan_micro_batch(self, preset: str, extra: list[str]) -> tuple[int, dict | None]:
        """The bench micro-batch, lowered to the plan's largest that fits this device (0: none fits)."""
        mb = self.mode.bench_micro_batch
        cmd = self.python("tools/memory_plan.py", "--json", "--preset", preset, "--gpus", "1", "--zero", "2",
                          "--micro-batch", str(mb), "--precision", "bf16", "--gpu-mem-gib", str(self.gpu_mem_gib()),
                          *extra)
        code, text, _ = run(cmd, self.env(), self.logs / f"plan_{preset}.log", self.timeout("memory_plan"))
        lines = json_lines(text)
        if code != 0 or not lines:
            return mb, None  # the bench and the measured plan step will show what is wrong
        plan = lines[-1]
        return min(mb, int(plan.get("max_micro_batch", mb))), plan

    def bench_extra(self, preset: str) -> list[str]:
        """Gradient checkpointing as the preset's config sets it (SDXL, the SD3 presets: on)."""
        from sidscale.config import load_config
        from sidscale.families.presets import preset_nets

        config = load_config(preset_nets(preset).config_preset(preset))
        return ["--grad-checkpointing"] if config.teacher.grad_checkpointing else []

    def bench(self, preset: str) -> dict[str, Any]:
        extra = self.bench_extra(preset)
        mb, plan = self.plan_micro_batch(preset, extra)
        if mb == 0:
            raise Skip(f"the memory plan predicts that no micro-batch of {preset} fits {self.gpu_mem_gib():.0f} GiB "
                       f"with ZeRO-2 on one device (plan: {plan and plan.get('total_gib')} GiB at micro-batch "
                       f"{self.mode.bench_micro_batch})")
        cmd = self.python("tools/bench.py", "--preset", preset, "--device", self.mode.device, "--zero", "2",
                          "--precision", "bf16", "--micro-batch", str(mb), *extra, "--steps", "3", "--warmup", "1",
                          "--baseline", "reference", "--baseline-micro-batch", "1")
        code, text, _ = run(cmd, self.env(), self.logs / f"bench_{preset}.log", self.timeout("bench"))
        lines = json_lines(text)
        keep = ("config", "s_per_iter", "samples_per_s", "ratio_vs_reference", "mfu", "achieved_tflops",
                "device_peak_gib", "phase_s", "device_name", "net_fwd_equivalents_per_sample", "error", "detail")
        numbers = {"micro_batch": mb, "results": [{k: r[k] for k in keep if k in r} for r in lines], "raw": lines}
        if code != 0 or not lines:
            raise StepFailed(f"tools/bench.py exited {code}", log_tail=tail(text), **numbers)
        bad = [r.get("config") for r in lines if "samples_per_s" not in r or r.get("error")]
        ours = [c for c in bad if c != "reference" and "/reference/" not in str(c)]
        if ours:
            raise StepFailed(f"configurations without a measurement: {ours}", **numbers)
        if bad:  # e.g. SDXL's fp32 reference recipe does not fit one GPU: recorded, not failed
            numbers["warnings"] = [f"the reference setting was not measured: {bad}"]
        return numbers

    def memory_plan(self, preset: str) -> dict[str, Any]:
        extra = self.bench_extra(preset)
        mb, plan = self.plan_micro_batch(preset, extra)
        if mb == 0:
            raise Skip(f"the memory plan predicts that no micro-batch of {preset} fits {self.gpu_mem_gib():.0f} GiB")
        cmd = self.python("tools/memory_plan.py", "--json", "--measure", "--preset", preset, "--zero", "2",
                          "--micro-batch", str(mb), "--precision", "bf16", "--device", self.mode.device,
                          "--gpu-mem-gib", str(self.gpu_mem_gib()), "--steps", "2", *extra)
        return self._measured_against_plan(cmd, f"memory_plan_{preset}", "memory_plan", mb,
                                           "tools/memory_plan.py --measure")

    def _measured_against_plan(self, cmd: list[str], log_name: str, timeout_key: str, mb: int,
                               what: str) -> dict[str, Any]:
        """Run a ``tools/memory_plan.py --measure`` command; its prediction must be within the tolerance."""
        code, text, _ = run(cmd, self.env(), self.logs / f"{log_name}.log", self.timeout(timeout_key))
        lines = [r for r in json_lines(text) if "measured" in r]
        if code != 0 or not lines:
            raise StepFailed(f"{what} exited {code}", log_tail=tail(text))
        rec = lines[-1]
        ratio = float(rec["predicted_over_measured"])
        numbers = {"micro_batch": mb, "predicted_gib": rec.get("total_gib"),
                   "measured_peak_gib": rec["measured"]["peak_gib"], "predicted_over_measured": ratio, "plan": rec}
        if not 1 / (1 + self.tol) <= ratio <= 1 + self.tol:
            raise StepFailed(f"the plan predicts {ratio:.3f} x the measured peak, outside 1 +- {self.tol:g}", **numbers)
        return numbers

    # ---------------------------------------------------------------- 9. the big presets (--big-preset)
    def big_plan(self, preset: str) -> dict[str, Any]:
        """The cheapest setting the memory plan says fits ``nproc`` GPUs of this machine's memory."""
        cmd = self.python("tools/scaling_model.py", "--memory", "--json", "--memory-presets", preset,
                          "--memory-gpus", str(self.nproc), str(self.nproc), "--gpu-mem-gib", str(self.gpu_mem_gib()))
        code, text, _ = run(cmd, self.env(), self.logs / f"big_plan_{preset}.log", self.timeout("memory_plan"))
        rows = json_lines(text)
        if code != 0 or not rows:
            raise StepFailed(f"tools/scaling_model.py --memory exited {code}", log_tail=tail(text))
        key = f"recommended_{self.nproc}_nopreview"
        chosen = [r for r in rows if r.get(key)]
        if not chosen:
            raise Skip(f"the memory plan predicts that no setting of {preset} fits {self.nproc} x "
                       f"{self.gpu_mem_gib():.0f} GiB")
        r = chosen[0]
        self.big_settings[preset] = r
        return {"setting": {k: r[k] for k in ("zero", "teacher_partitioned", "text_encoders", "grad_checkpointing")},
                "max_micro_batch": r[f"max_mb_{self.nproc}_nopreview"],
                "predicted_gib_mb1": r[f"gib_mb1_{self.nproc}_nopreview"]}

    def big_measure(self, preset: str) -> dict[str, Any]:
        r = self.big_settings.get(preset)
        if r is None:
            raise Skip("no setting from big_plan")
        if r["text_encoders"] != "replicated":
            raise Skip(f"the setting that fits needs text encoders {r['text_encoders']}: the measured trainer keeps "
                       "them on every rank")
        mb = r[f"max_mb_{self.nproc}_nopreview"]  # on GPUs the edge of the prediction is what is checked
        if self.mode.device == "cpu":  # the smoke run checks the plumbing, at the smoke's micro-batch
            mb = min(mb, self.mode.bench_micro_batch)
        extra = (["--grad-checkpointing"] if r["grad_checkpointing"] else []) + (
            ["--teacher-partitioned"] if r["teacher_partitioned"] else [])
        from sidscale.distributed.runtime import free_port

        cmd = self.python("-m", "torch.distributed.run", f"--nproc_per_node={self.nproc}",
                          f"--master_port={free_port()}", "tools/memory_plan.py", "--json", "--measure",
                          "--preset", preset, "--zero", str(r["zero"]),
                          "--micro-batch", str(mb), "--precision", "bf16", "--device", self.mode.device,
                          "--gpu-mem-gib", str(self.gpu_mem_gib()), "--steps", "2", *extra)
        return self._measured_against_plan(cmd, f"big_measure_{preset}", "big_measure", mb,
                                           "torchrun tools/memory_plan.py --measure")

    # ---------------------------------------------------------------- collectives and GPU tests
    def comm_check(self) -> dict[str, Any]:
        """Every sidscale collective once on the real backend (NCCL on GPUs): seconds, before the big run."""
        from sidscale.distributed.runtime import free_port

        cmd = self.python("-m", "torch.distributed.run", f"--nproc_per_node={self.nproc}",
                          f"--master_port={free_port()}", "tools/comm_check.py")
        code, text, _ = run(cmd, self.env(), self.logs / "comm_check.log", self.timeout("comm_check"))
        lines = [r for r in json_lines(text) if "checks" in r]
        if code != 0 or not lines or not lines[-1].get("ok"):
            raise StepFailed(f"tools/comm_check.py exited {code}", log_tail=tail(text))
        return lines[-1]

    def gpu_tests(self) -> dict[str, Any]:
        """The test suite's ``gpu`` tests (skipped on CPU machines): NCCL collectives, CUDA memory."""
        if self.mode.device != "cuda":
            raise Skip("the gpu tests need CUDA")
        cmd = self.python("-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests")
        code, text, _ = run(cmd, self.env(), self.logs / "gpu_tests.log", self.timeout("gpu_tests"))
        summary = [line for line in text.splitlines() if " passed" in line or " failed" in line or " error" in line]
        if code != 0 or " skipped" in (summary[-1] if summary else ""):
            raise StepFailed(f"pytest -m gpu exited {code}", log_tail=tail(text))
        return {"summary": summary[-1] if summary else ""}

    # ---------------------------------------------------------------- all
    def run_all(self) -> bool:
        self.step("environment", self.environment)
        if self.part == "all":
            self.step("comm_check", self.comm_check, needs=("environment",))
            self.step("gpu_tests", self.gpu_tests, needs=("comm_check",))
        if self.part in ("all", "main"):
            self.run_main()
        if self.part in ("all", "big"):
            for preset in self.big_presets:
                self.step(f"big_plan_{preset}", lambda p=preset: self.big_plan(p), needs=("environment",))
                self.step(f"big_measure_{preset}", lambda p=preset: self.big_measure(p),
                          needs=(f"big_plan_{preset}",))
        if self.part == "big":  # one GPU: NCCL with itself and the CUDA tests, the least news, last
            self.step("comm_check", self.comm_check, needs=("environment",))
            self.step("gpu_tests", self.gpu_tests, needs=("comm_check",))
        ok = all(s["status"] != "fail" for s in self.record["steps"])
        self.record["ok"] = ok
        self.save()
        self.copy_images()
        return ok

    def copy_images(self) -> None:
        """With an output folder: the preview and the sample beside the JSON (what a reader looks at)."""
        if self.results_dir is None:
            return
        stem = self.out.stem
        for src, name in ((self.run_dir / "samples" / f"step_{MAX_STEPS:08d}.png", f"{stem}_preview.png"),
                          (self.work / "sample.png", f"{stem}_sample.png")):
            if src.is_file():
                shutil.copyfile(src, self.results_dir / name)

    def run_main(self) -> None:
        self.step("write_teacher", self.write_teacher, needs=("environment",))
        self.step("disk_space", self.disk_space, needs=("write_teacher",))
        self.step("train_checkpoint_kill", self.train_checkpoint_kill, needs=("disk_space",))
        self.step("resume_train_export", self.resume_train_export, needs=("train_checkpoint_kill",))
        self.step("sample", self.sample, needs=("resume_train_export",))
        for preset in self.bench_presets:
            self.step(f"bench_{preset}", lambda p=preset: self.bench(p), needs=("environment",))
            self.step(f"memory_plan_{preset}", lambda p=preset: self.memory_plan(p), needs=("environment",))


def with_train_preset(mode: Mode, preset: str) -> Mode:
    """``mode`` training ``preset``. A published SD3 preset writes ~15-27 GB of random weights (the
    transformer and T5-XXL built on the CPU): its write step gets more time."""
    from sidscale.families.sd3.presets import DIT_PRESETS

    timeouts = dict(mode.timeouts)
    if preset in DIT_PRESETS:
        timeouts["write_teacher"] = max(1200.0, mode.timeout("write_teacher"))
    return dataclasses.replace(mode, train_preset=preset, timeouts=timeouts)


# ------------------------------------------------------------------------------------------ the dry run
# what sidscale imports from outside the standard library and torch; each must import in the GPU-like env
THIRD_PARTY = ("deepspeed", "diffusers", "transformers", "webdataset", "open_clip", "cleanfid", "safetensors",
               "tensorboard", "yaml", "numpy", "scipy", "PIL", "tqdm", "packaging")
IMPORT_PROBE = r"""
import importlib, json, pkgutil, sys, time
t0 = time.monotonic()
import torch
out = {"python": sys.version.split()[0], "executable": sys.executable, "torch": torch.__version__, "modules": 0}
third = sys.argv[1].split(",")
for name in third:
    mod = importlib.import_module(name)
    out[name] = getattr(mod, "__version__", "?")
import sidscale
failed = {}
for info in pkgutil.walk_packages(sidscale.__path__, "sidscale."):
    try:
        importlib.import_module(info.name)
        out["modules"] += 1
    except Exception as e:
        failed[info.name] = f"{type(e).__name__}: {e}"
# the classes the families build, and DeepSpeed's accelerator (cpu here, cuda there)
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel  # noqa
from transformers import CLIPTextModel, T5EncoderModel  # noqa
from deepspeed.accelerator import get_accelerator
out["ds_accelerator"] = get_accelerator().device_name()
out["sidscale_from"] = sidscale.__file__
out["failed"] = failed
out["seconds"] = round(time.monotonic() - t0, 1)
print(json.dumps(out))
"""
REQUIREMENTS_PROBE = r"""
import json, sys
from importlib.metadata import distribution, distributions, PackageNotFoundError
from packaging.requirements import Requirement
target = sys.argv[1]
problems, names = [], []
for dist in distributions(path=[target]):
    names.append(f"{dist.metadata['Name']}=={dist.version}")
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = distribution(req.name).version
        except PackageNotFoundError:
            problems.append(f"{dist.metadata['Name']} needs {req}: not installed")
            continue
        if not req.specifier.contains(have, prereleases=True):
            problems.append(f"{dist.metadata['Name']} needs {req}: found {have}")
print(json.dumps({"installed": sorted(names), "problems": problems}))
"""


def find_python312() -> tuple[str, str]:
    """A Python 3.12 interpreter (the GPU image's version) and how it was found; else this one."""
    candidates: list[tuple[str, str]] = []
    if uv := shutil.which("uv"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            found = subprocess.run([uv, "python", "find", "3.12"], capture_output=True, text=True, timeout=60)
            if found.returncode == 0 and found.stdout.strip():
                candidates.append((found.stdout.strip(), "uv python find 3.12"))
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates += [(str(p), "pyenv") for p in sorted(pyenv.glob("3.12*/bin/python3.12"), reverse=True)]
    if on_path := shutil.which("python3.12"):
        candidates.append((on_path, "python3.12 on PATH"))
    for exe, how in candidates:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            probe = subprocess.run([exe, "-c", "import sys, venv; print(sys.version_info[:2] == (3, 12))"],
                                   capture_output=True, text=True, timeout=60)
            if probe.stdout.strip() == "True":
                return exe, how
    return sys.executable, f"this Python {sys.version.split()[0]} (no Python 3.12 found)"


class DryRun(Check):
    """The GPU machine's start rehearsed HERE: a fresh venv of Python 3.12 (as the image's), the GPU image's
    packages from ``--image-site`` (a site-packages with its torch 2.11, transformers, ...; without one the
    steps that need torch are skipped), the wheelhouse installed with no index into an empty target by the
    same code the GPU run uses (tools/gpu_check.sh), every requirement and import checked, then the main
    part on the CPU (tiny preset, gloo) in that environment: the sequence of a lent machine's first call."""

    def __init__(self, *args: Any, image_site: Path | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.image_site = image_site
        self.venv = self.work / "venv"
        self.target = self.work / "site"
        self.venv_python = self.venv / "bin" / "python"

    def venv_env(self, with_target: bool = True) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu",
                   OMP_NUM_THREADS="1", PY=str(self.venv_python))
        env["PYTHONPATH"] = os.pathsep.join([str(self.target), str(REPO)] if with_target else [str(REPO)])
        return env

    def make_venv(self) -> dict[str, Any]:
        exe, how = find_python312()
        shutil.rmtree(self.venv, ignore_errors=True)
        code, text, seconds = run([exe, "-m", "venv", str(self.venv)], self.venv_env(False),
                                  self.logs / "dry_venv.log", self.timeout("default"))
        if code != 0:
            raise StepFailed(f"{exe} -m venv exited {code}", log_tail=tail(text))
        version = subprocess.run([str(self.venv_python), "-c", "import sys; print(sys.version.split()[0])"],
                                 capture_output=True, text=True, timeout=60).stdout.strip()
        return {"python": exe, "found_by": how, "version": version, "seconds": round(seconds, 1)}

    def image(self) -> dict[str, Any]:
        if self.image_site is None:
            raise Skip("no --image-site (GPU_CHECK_IMAGE_SITE): the GPU image's torch is not here, so the steps "
                       "that import it are skipped")
        site = next((self.venv / "lib").glob("python3*/site-packages"))
        # a .pth line puts the image's packages after the venv's own: as the image's site on the GPU machine
        (site / "_gpu_image.pth").write_text(f"{self.image_site}\n")
        probe = "import json, torch, transformers; print(json.dumps({'torch': torch.__version__, " \
                "'transformers': transformers.__version__, 'deepspeed_missing': " \
                "__import__('importlib.util').util.find_spec('deepspeed') is None}))"
        code, text, _ = run([str(self.venv_python), "-c", probe], self.venv_env(False), self.logs / "dry_image.log",
                            self.timeout("default"))
        lines = json_lines(text)
        if code != 0 or not lines:
            raise StepFailed(f"the image site {self.image_site} does not import torch", log_tail=tail(text))
        if not lines[-1]["deepspeed_missing"]:
            raise StepFailed(f"the image site {self.image_site} has deepspeed: it would hide the wheelhouse's")
        return {"image_site": str(self.image_site), **lines[-1]}

    def install_wheels(self) -> dict[str, Any]:
        shutil.rmtree(self.target, ignore_errors=True)
        cmd = ["bash", "tools/gpu_check.sh", "--install-wheels", str(self.target)]
        code, text, seconds = run(cmd, self.venv_env(False), self.logs / "dry_install.log", self.timeout("default"))
        if code != 0:
            raise StepFailed(f"installing the wheelhouse with --no-index exited {code}", log_tail=tail(text))
        probe = [str(self.venv_python), "-c", REQUIREMENTS_PROBE, str(self.target)]
        code, text, _ = run(probe, self.venv_env(), self.logs / "dry_requirements.log", self.timeout("default"))
        lines = json_lines(text)
        if code != 0 or not lines:
            raise StepFailed(f"the requirements probe exited {code}", log_tail=tail(text))
        numbers = {"seconds": round(seconds, 1), "installed": lines[-1]["installed"],
                   "target_mib": round(dir_bytes(self.target) / 2**20, 1)}
        if lines[-1]["problems"]:
            raise StepFailed("unmet requirements: " + "; ".join(lines[-1]["problems"]), **numbers)
        return numbers

    def imports(self) -> dict[str, Any]:
        cmd = [str(self.venv_python), "-c", IMPORT_PROBE, ",".join(THIRD_PARTY)]
        code, text, _ = run(cmd, self.venv_env(), self.logs / "dry_imports.log", self.timeout("default"))
        lines = json_lines(text)
        if code != 0 or not lines:
            raise StepFailed(f"the import probe exited {code}", log_tail=tail(text))
        info = lines[-1]
        if info["failed"]:
            raise StepFailed(f"sidscale modules that do not import: {sorted(info['failed'])}", **info)
        if not str(info["deepspeed"]) or not info["sidscale_from"].startswith(str(REPO)):
            raise StepFailed("deepspeed or sidscale came from the wrong place", **info)
        return info

    def cpu_main(self) -> dict[str, Any]:
        """The main part as a lent machine's first call runs it (tools/gpu_check.sh ... --part main), on
        the CPU with the tiny preset, in the venv with the wheelhouse."""
        folder = self.results_dir or self.work / "cpu_main_out"
        out = folder / "cpu_main.json"  # the name the child gives its JSON in an output folder
        budget = min(PART_BUDGET_S, self.budget_left() - 15)  # what a lent machine's call gives the part
        cmd = [str(self.venv_python), "tools/gpu_check.py", "--cpu-smoke", "--part", "main", "--out", str(folder),
               "--workdir", str(self.work / "cpu_main"), "--budget-s", f"{budget:.0f}"]
        code, text, seconds = run(cmd, self.venv_env(), self.logs / "dry_cpu_main.log", budget + 10)
        record = json.loads(out.read_text()) if out.is_file() else {}
        steps = {s["name"]: s["status"] for s in record.get("steps", [])}
        numbers = {"seconds": round(seconds, 1), "steps": steps, "torch": record.get("environment", {}).get("torch")}
        if code != 0 or not steps or any(v != "pass" for v in steps.values()):
            raise StepFailed(f"the main part on the CPU exited {code}", log_tail=tail(text), **numbers)
        return numbers

    def run_all(self) -> bool:
        self.step("dry_venv", self.make_venv)
        self.step("dry_image", self.image, needs=("dry_venv",))
        self.step("dry_install", self.install_wheels, needs=("dry_venv",))
        self.step("dry_imports", self.imports, needs=("dry_image", "dry_install"))
        self.step("dry_cpu_main", self.cpu_main, needs=("dry_imports",))
        ok = all(s["status"] != "fail" for s in self.record["steps"])
        # NOTE: a dry run that skipped the torch steps proved less: say so, in the verdict too
        self.record["ok"] = ok and all(s["status"] == "pass" for s in self.record["steps"])
        self.save()
        return self.record["ok"]


def default_out(mode: Mode) -> Path:
    host = socket.gethostname().split(".")[0]
    prefix = "gpu_check" if mode.device == "cuda" else "gpu_check_cpu-smoke"
    return REPO / "bench" / "results" / f"{prefix}_{host}_{time.strftime('%Y%m%d-%H%M%S')}.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="the same sequence on the CPU: tiny preset, gloo, 2 ranks")
    p.add_argument("--out", type=Path, default=None,
                   help="the JSON (default bench/results/gpu_check_<host>_<date>.json)")
    p.add_argument("--workdir", type=Path, default=os.environ.get("GPU_CHECK_WORKDIR") or None,
                   help="teacher, run, checkpoints (~32 GB at SD1.5 size; default: a new temp dir, removed after)")
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("--nproc", type=int, default=None, help="trainer ranks (default: every visible GPU; 2 on the CPU)")
    p.add_argument("--preset", default=None,
                   help="the architecture written, trained, resumed, exported and sampled (default: sd15; tiny "
                        "with --cpu-smoke); also benchmarked and planned after the default presets. An SD3 preset "
                        "(sd3_medium, sd35_medium, sd35_large; sd3_tiny on the CPU) trains with its SD3 config")
    p.add_argument("--bench-presets", nargs="*", default=None,
                   help="presets for the benchmark and the memory plan (default: sd15; tiny with --cpu-smoke; "
                        "plus --preset)")
    p.add_argument("--big-preset", action="append", default=[],
                   choices=["sd35_large", "flux_dev", "sd3_tiny", "flux_dev_4l", "sd35_large_4l"],
                   help="also plan and measure this big preset at the setting the memory plan says fits this "
                        "machine's GPUs (steps big_plan_*, big_measure_*; repeatable; sd3_tiny: the same steps on "
                        "a CPU-sized preset, for --cpu-smoke; *_4l: a few blocks at real width, the --part big "
                        f"default {' '.join(DEFAULT_BIG_PRESETS)})")
    p.add_argument("--plan-tolerance", type=float, default=0.25,
                   help="memory plan step passes when predicted / measured is within [1/(1+t), 1+t]")
    p.add_argument("--part", choices=PARTS, default="all",
                   help="main: SD1.5-size main() end to end, bench and memory plan; big: the big presets' memory "
                        "check, then NCCL and the CUDA tests; all: everything (default). With main or big the "
                        f"steps share a time budget (--budget-s, default {PART_BUDGET_S:g} s)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting steps, and cut the running one, when this many seconds have passed (the "
                        "JSON and logs are written all the same)")
    p.add_argument("--dry-run", action="store_true",
                   help="here, not on the GPU: a fresh Python 3.12 venv, the wheelhouse (.gpu_wheels) installed "
                        "with --no-index into an empty target, every import, then --part main on the CPU in it")
    p.add_argument("--image-site", type=Path, default=os.environ.get("GPU_CHECK_IMAGE_SITE") or None,
                   help="--dry-run: a site-packages standing for the GPU image's (torch 2.11, transformers, ...; "
                        "README 'GPU check' says how to make one)")
    p.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                   help="another trainer override for the main part, after the check's own (repeatable), e.g. "
                        "deepspeed.config=ds_configs/zero3.json and teacher.partitioned=true on 2 GPUs")
    p.add_argument("--only", default=None,
                   help="comma-separated step names or prefixes (write, disk, train, resume, sample, bench, memory) "
                        "to run; the environment step always runs. With --workdir and --keep-workdir the sequence "
                        "can be split over several calls")
    args = p.parse_args(argv)
    mode = SMOKE_MODE if args.cpu_smoke else GPU_MODE
    bench_presets = args.bench_presets if args.bench_presets is not None else (["tiny"] if args.cpu_smoke else ["sd15"])
    if args.preset is not None:
        from sidscale.testing.random_teacher import PRESETS

        if args.preset not in PRESETS:
            p.error(f"--preset {args.preset!r}: expected one of {', '.join(PRESETS)}")
        mode = with_train_preset(mode, args.preset)
        if args.bench_presets is None and args.preset not in bench_presets:
            bench_presets = [*bench_presets, args.preset]
    part = "dry-run" if args.dry_run else args.part
    default_budget = {"all": None, "dry-run": PART_BUDGET_S + DRY_RUN_SETUP_S}.get(part, PART_BUDGET_S)
    budget = args.budget_s if args.budget_s is not None else default_budget
    results_dir = None
    if args.out is not None and (args.out.is_dir() or args.out.suffix != ".json"):
        # a folder (a lent machine's $OUT): one JSON and one log per part, the preview and the sample
        results_dir = args.out.resolve()
        results_dir.mkdir(parents=True, exist_ok=True)
        prefix = "gpu_check" if mode.device == "cuda" and not args.dry_run else "cpu"
        out = results_dir / f"{prefix}_{part}.json"
    else:
        out = (args.out or default_out(mode)).resolve()
    made_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="sidscale-gpu-check-")) if made_workdir else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    if args.dry_run:
        check: Check = DryRun(SMOKE_MODE, out, workdir, args.nproc, bench_presets, args.plan_tolerance, only,
                              part=part, budget_s=budget, results_dir=results_dir,
                              image_site=args.image_site.resolve() if args.image_site else None)
    else:
        check = Check(mode, out, workdir, args.nproc, bench_presets, args.plan_tolerance, only, part=part,
                      budget_s=budget, results_dir=results_dir)
    default_big = ["sd3_tiny"] if args.cpu_smoke else DEFAULT_BIG_PRESETS  # the CPU holds no real-width layer
    check.big_presets = list(args.big_preset) or (default_big if part == "big" else [])
    check.train_set = list(args.train_set)
    check.record["settings"]["train_set"] = check.train_set

    def on_term(signum, frame):  # a SIGTERM (scheduler, timeout) still writes the JSON and kills the children
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    ok = False
    try:
        ok = check.run_all()
    except KeyboardInterrupt as e:
        check.record["steps"].append({"name": "interrupted", "status": "fail", "reason": f"interrupted ({e})"})
        check.record["ok"] = False
        check.save()
    finally:
        if made_workdir and not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"gpu_check: {'PASS' if ok else 'FAIL'}: {out}", flush=True)
    for s in check.record["steps"]:
        print(f"  {s['name']:24s} {s['status']:8s} {s.get('seconds', 0):7.1f} s  {s.get('reason', '')}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
