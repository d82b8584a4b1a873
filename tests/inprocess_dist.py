"""A 1-rank process group inside the pytest process, for tests that build DeepSpeed engines in-process.

NOTE: the group is created once per pytest process and not destroyed by these tests: DeepSpeed
caches the first group's handles (deepspeed.utils.groups), so engines built after a
destroy_process_group() + re-init fail ("Group ... is not registered"). The environment variables
init_distributed sets (RANK, MASTER_PORT, ...) are removed again so subprocess-launching tests do
not inherit them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from sidscale.distributed.runtime import DistInfo


@contextlib.contextmanager
def one_rank_group() -> Iterator[DistInfo]:
    from sidscale.distributed.runtime import init_distributed

    saved_env = dict(os.environ)
    try:
        yield init_distributed()
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
