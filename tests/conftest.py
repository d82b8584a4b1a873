"""Shared test setup: everything offline and on CPU (set before any library reads the env), and the
session-wide fixtures that several test files share instead of each paying for its own copy."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_toy_teacher(tmp_path_factory):
    """The tiny random-weight toy teacher (8x8 pixels) of the trainer, fault and eval tests."""
    from sidscale.families.toy.tiny import write_tiny_toy_teacher

    return write_tiny_toy_teacher(tmp_path_factory.mktemp("teacher") / "toy", sample_size=8)


# The flow-matching toy teacher of the tests: the same UNet as the built-in one, fitted to the exact
# velocity of an 8x8 mixture for 80 steps, no fit report (see tests/test_toy_flow.py for what it reaches).
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
    fault test compare with, bit for bit. See tests/reference_run.py for its settings."""
    from tests.dist_launch import run_trainer
    from tests.reference_run import overrides

    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_trainer(run_dir, overrides(tiny_toy_teacher))
    return run_dir


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests need CUDA: on a CPU machine they are skipped with the reason (and counted as
    skipped, never as passed); tools/gpu_check.sh runs them on a GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run by tools/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
