"""Shared test setup: everything offline and on CPU (set before any library reads the env), and the
session-wide fixtures that several test files share instead of each paying for its own copy."""

import gc
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch.nn.functional  # noqa: E402

# torch's own F.linear, before anything in this process could replace it (see fresh_functional_linear)
TORCH_LINEAR = torch.nn.functional.linear


@pytest.fixture(autouse=True, scope="module")
def fresh_functional_linear():
    """Each test module starts with torch's own F.linear, as in a fresh process. DeepSpeed's
    ``zero.Init`` (ZeRO-3) replaces it for the rest of the process ("this will persist unless manually
    reset"); a module that ran later on the same process then scripted or measured DeepSpeed's
    wrapper (torch.jit.script fails on it; memory-plan peaks move), depending on which modules an
    xdist worker happened to run before it."""
    yield
    torch.nn.functional.linear = TORCH_LINEAR


@pytest.fixture(autouse=True, scope="module")
def environment_restored_after_each_module():
    """Each test module starts with the process environment the session started with. Product code
    writes rendezvous variables itself (RANK from SLURM_PROCID, a one-rank group's RANK=0...), outside
    any monkeypatch; under xdist a leak would make a later module on the same worker a different rank."""
    before = dict(os.environ)
    yield
    if os.environ != before:
        os.environ.clear()
        os.environ.update(before)


@pytest.fixture(scope="session")
def tiny_toy_teacher(tmp_path_factory):
    """The tiny random-weight toy teacher (8x8 pixels) of the trainer, fault and eval tests."""
    from sidscale.families.toy.tiny import write_tiny_toy_teacher

    return write_tiny_toy_teacher(tmp_path_factory.mktemp("teacher") / "toy", sample_size=8)


# The flow-matching toy teacher of the tests: the same UNet as the built-in one, fitted to the exact
# velocity of an 8x8 mixture for 80 steps, no fit report (see tests/families/test_toy_flow.py for what it reaches).
TINY_TOY_FLOW_SPEC = dict(fit_steps=80, eval_samples=0, parameterisation="flow")


@pytest.fixture(scope="session")
def tiny_toy_flow_teacher(tmp_path_factory):
    """A fitted flow toy teacher (teacher.kind toy_flow), in a temporary cache (never ~/.cache)."""
    from sidscale.families.toy.fit import ToyTeacherSpec, ensure_toy_teacher
    from sidscale.families.toy.mixture import ToyMixture

    spec = ToyTeacherSpec(mixture=ToyMixture(size=8).to_dict(), **TINY_TOY_FLOW_SPEC)
    return ensure_toy_teacher(tmp_path_factory.mktemp("toy_flow_cache"), spec)


@pytest.fixture(scope="session")
def fp32_reference_run(tiny_toy_teacher, tmp_path_factory):
    """ONE uninterrupted 2-rank fp32 run (checkpoints at steps 2, 4, 6) that the resume and every
    fault test compare with, bit for bit. See tests/helpers/reference_run.py for its settings."""
    from tests.helpers.dist_launch import run_trainer
    from tests.helpers.reference_run import overrides

    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_trainer(run_dir, overrides(tiny_toy_teacher))
    return run_dir


# pytest-xdist (`make test` runs `-n 2 --dist loadfile`): every test module is one unit of work, so
# its module-scoped fixtures are built once; modules that share an expensive session fixture (built
# once per worker) or a machine-wide resource are one unit together. A module is listed once.
SHARED_UNITS = {
    # the uninterrupted 2-rank fp32 run that the resume and fault tests compare with, bit for bit
    "fp32_reference_run": ("test_trainer", "test_fault_tolerance", "test_resume_faults"),
    # the local SLURM clusters: one apt-get install at a time (dpkg's lock), one cluster at a time
    "slurm": ("test_slurm", "test_slurm_multinode"),
    # the memory plan of the full-size presets: its per-preset costs (meta-device builds and activation
    # traces of SDXL, SD3.5, FLUX, ..., sidscale/perf/preset_costs.py) are cached per process; one worker
    # computes them once (measured: 121 CPU-seconds together, 186 in separate processes)
    "memory_plan": ("test_preview_memory", "test_presets", "test_sd3_presets", "test_flux_presets",
                    "test_teacher_partition", "test_perf", "test_scaling"),
    # the fitted flow toy teacher (tiny_toy_flow_teacher: 80 fit steps, ~13 CPU-seconds in each worker
    # that fits it)
    "toy_flow_teacher": ("test_toy_flow", "test_adversarial_training"),
}
# Units started first, longest first: a long unit picked up last would leave the other worker idle at
# the end. The order of the per-unit totals of `--durations=0` on this project's 2-core machine
# (2026-12-04); the rest follow in file order. Except test_long_work_waits: its worker mostly waits
# (rank 0 slowed past the timeout), so it is picked up when the first long unit ends, while the other
# worker runs the multi-node SLURM jobs or the multi-rank equivalence runs, which use more than one core
# and fill the idle one (placed 8th, it ran beside single-process tests: a core idle for ~55 s).
LONG_UNITS_FIRST = ("slurm", "fp32_reference_run", "test_long_work_waits", "memory_plan", "test_trainer_equivalence",
                    "test_sd3_family", "test_terminal", "test_teacher_partition_resume", "toy_flow_teacher",
                    "test_numerics", "test_reference_toy", "test_flux_family")


def unit_of(path: str) -> str:
    """The unit of work of the test module at ``path`` (a node id's file part)."""
    module = Path(path).stem
    for unit, modules in SHARED_UNITS.items():
        if module in modules:
            return unit
    return module


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: only called when it is installed
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with SHARED_UNITS: files of one unit go to the same worker, in the
    order the workers collected them (LONG_UNITS_FIRST first). xdist's own ``xdist_group`` marks
    cannot do this on pytest 9 (they rename node ids, which pytest 9 no longer allows)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class UnitScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid.split("::", 1)[0])

    config.option.loadscopereorder = False
    return UnitScheduling(config, log)


def pytest_configure(config):
    if hasattr(config, "workerinput"):
        # Two workers on two cores: one intra-op thread each, as every launched rank already has
        # (OMP_NUM_THREADS=1 in tests/helpers/dist_launch.py); two threads each would oversubscribe.
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


_module_running = [""]


def pytest_runtest_setup(item):
    """At the first test of each module (the first one right after collection; later ones once the
    previous module's fixtures are torn down): collect once, then freeze what is still alive out of the
    garbage collector's scans. After collection that is every test module and what it imports at module
    level (torch, DeepSpeed, diffusers, ...); later, what the previous modules imported lazily and the
    session fixtures. A full collection later (DeepSpeed forces one per memory report at engine build: 16
    in one bf16 ZeRO-1 trainer build) then walks only what the current module created. Measured on the
    numerics, toy-flow and eval files in one process: 12.5 s of their 80 CPU-seconds in the collector,
    8.9 s with the after-collection freeze; the per-module one gained another ~3 % on five files."""
    module = item.nodeid.split("::", 1)[0]
    if _module_running[0] != module:
        _module_running[0] = module
        gc.collect()
        gc.freeze()


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests need CUDA: on a CPU machine they are skipped with the reason (and counted as
    skipped, never as passed); tools/gpu_check.sh runs them on a GPU. In an xdist worker, the long
    units of work are put first (the scheduler hands out units in the workers' order)."""
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (run by tools/gpu_check.sh)")
        for item in items:
            if item.get_closest_marker("gpu"):  # not item.keywords: that holds the folder name tests/gpu too
                item.add_marker(skip)
    if hasattr(config, "workerinput"):
        rank = {unit: i for i, unit in enumerate(LONG_UNITS_FIRST)}
        items.sort(key=lambda item: rank.get(unit_of(item.nodeid.split("::", 1)[0]), len(rank)))
