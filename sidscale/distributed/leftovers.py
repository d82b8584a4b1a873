"""Parameters the frozen ZeRO-3 networks leave gathered after the generator's backward.

In the generator step the fake net and a partitioned teacher run inside the generator's graph but
never run a ``backward()`` of their own engine. DeepSpeed releases the parameters of sub-modules
whose post-backward hook never fired (a hook attaches to positional inputs that require grad only:
a no-grad input, a keyword argument, a recomputed checkpointed block) in ``backward_epilogue`` of the
engine whose backward ran, i.e. the generator's, so those of the frozen networks would stay gathered
(a whole layer's worth of memory each, unbounded and outside the memory plan). Releasing them after
each generator backward is a local operation (no collective) and a no-op when nothing is left.
"""

from __future__ import annotations

from typing import Any


def _zero3_offload(engine: Any) -> Any | None:
    """The ZeRO-3 parameter coordinator's owner (``DeepSpeedZeRoOffload``) of ``engine``, or None."""
    if engine is None:
        return None
    opt = getattr(engine, "optimizer", None)
    offload = getattr(opt, "parameter_offload", None)  # ZeRO-3 with an optimizer (the fake net)
    if offload is None and type(opt).__name__ == "DeepSpeedZeRoOffload":  # the optimizer-less teacher
        offload = opt
    return offload if hasattr(offload, "release_backward_leftovers") else None


def release_backward_leftovers(*engines: Any) -> None:
    """Release what the frozen ZeRO-3 ``engines`` still hold gathered (None and ZeRO-1/2: nothing)."""
    for engine in engines:
        offload = _zero3_offload(engine)
        if offload is not None:
            offload.release_backward_leftovers()
