"""Checks only a CUDA machine can run (marker ``gpu``: skipped with the reason on CPU machines, run by
``tools/gpu_check.sh`` as ``pytest -m gpu``).

Every collective sidscale makes, through ``sidscale.distributed.comm``, on a real one-rank NCCL group:
NCCL rejects CPU tensors, which no gloo test can show.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers.inprocess import single_rank_environment

pytestmark = pytest.mark.gpu


@pytest.fixture
def nccl_group():
    with single_rank_environment():
        torch.cuda.set_device(0)
        torch.distributed.init_process_group("nccl", rank=0, world_size=1)
        yield torch.device("cuda", 0)


def test_every_comm_helper_under_nccl(nccl_group):
    from sidscale.distributed import comm
    from tools.comm_check import run_checks

    assert comm.comm_device() == nccl_group
    done = run_checks(nccl_group)
    assert "all_reduce(cpu tensor)" in done and "gather_to_rank0(cuda tensor)" in done and "barrier" in done


def test_nccl_error_handling_default_is_set_by_init():
    """init_distributed sets TORCH_NCCL_ASYNC_ERROR_HANDLING (unless the user did), so a rank blocked
    in a collective after its peer died is ended by NCCL instead of hanging until the watchdog."""
    from deepspeed.accelerator import real_accelerator
    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

    from sidscale.distributed.runtime import init_distributed

    # NOTE: tests/conftest.py makes DeepSpeed's (process-wide, cached) accelerator the CPU one.
    saved = real_accelerator.ds_accelerator
    real_accelerator.set_accelerator(CUDA_Accelerator())
    try:
        with single_rank_environment({"DS_ACCELERATOR": "cuda"}):
            os.environ.pop("TORCH_NCCL_ASYNC_ERROR_HANDLING", None)
            info = init_distributed()
            assert info.device.type == "cuda"
            assert torch.distributed.get_backend() == "nccl"
            assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    finally:
        real_accelerator.ds_accelerator = saved
