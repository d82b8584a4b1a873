"""The fork server's one preload module: every module of ``PRELOAD`` imported with the garbage collector
off, then the whole imported heap frozen out of its scans, before any rank is forked.

Imported one by one with the collector on, the fork server ran a full collection each time its heap grew
by a quarter (~20 % of its CPU), and every forked rank inherited that heap unfrozen: each of the rank's
full collections (DeepSpeed forces some at engine build and around ZeRO-3 cache releases) walked every
module object again, ~20 % of a short rank's CPU, and wrote to every object header it visited, so the
kernel copied each shared page into the rank (copy-on-write). Frozen objects are never visited."""

from __future__ import annotations

import gc

gc.disable()  # before the import below too: tests.helpers.dist_launch imports torch
try:
    import importlib

    from tests.helpers.dist_launch import PRELOAD

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # as the fork server's own preload loop: a module this install lacks is skipped
            pass
finally:
    gc.freeze()
    gc.enable()
