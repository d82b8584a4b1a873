"""What a person sees in the terminal: a progress bar (with ETA) for each of sidscale's long phases,
the names the bars and logs give the method and samplers, and the one place where the few
third-party messages that would break the bars are silenced.

Only the messages named in ``quiet_third_party`` are dropped, each matched on its exact text;
sidscale's own warnings and logs, and any other third-party warning, still show.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from typing import Any

# diffusers' ModelMixin.to(dtype) warns on every cast, also when its list of float32 modules is empty
# (a diffusers bug: it tests ``fp32_modules is not None`` on ``self._keep_in_fp32_modules or []``); an
# fp16 decode with force_upcast casts twice, every preview and every evaluation batch. A non-empty
# list is real information and still shows.
_EMPTY_FP32_MODULES = re.compile(r"There are modules in \w+ that should be kept in float32: \[\]\. ")
# diffusers' five-line notice when ``accelerate`` (not a dependency) is absent: loading then takes the
# ordinary path, which is what sidscale wants for its meta-free loads.
_NO_ACCELERATE = re.compile(r"Cannot initialize model with low cpu memory usage because `accelerate` was not "
                            r"found in the environment")
# torch >= 2.12 deprecates the collective DeepSpeed's ZeRO optimizers call after every step; the call
# is DeepSpeed's, not sidscale's (sidscale's own collectives are in sidscale/distributed/comm.py).
_ALL_GATHER_DEPRECATION = r"`torch\.distributed\.all_gather_into_tensor` is deprecated"
DIFFUSERS_LOGGER = "diffusers.models.modeling_utils"


class _DropMessages(logging.Filter):
    def __init__(self, *patterns: re.Pattern) -> None:
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.match(message) for p in self.patterns)


def quiet_third_party() -> None:
    """Silence exactly the third-party messages named above (the entry points call it; calling it again
    changes nothing: the log filter is added once, an identical warnings filter replaces itself).

    Also turns off transformers' own weight loading / saving bars ("Loading weights", "Writing model
    shards"): one per rank and per encoder, they would interleave with sidscale's bars."""
    logger = logging.getLogger(DIFFUSERS_LOGGER)
    if not any(isinstance(f, _DropMessages) for f in logger.filters):
        logger.addFilter(_DropMessages(_EMPTY_FP32_MODULES, _NO_ACCELERATE))
    warnings.filterwarnings("ignore", message=_ALL_GATHER_DEPRECATION, category=FutureWarning)
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:  # transformers is a dependency; without it there is no bar to turn off
        return
    transformers_logging.disable_progress_bar()


def progress(total: int, desc: str, enabled: bool = True, unit: str = "it", **kwargs: Any):
    """A tqdm bar on stdout (where sidscale's lines go, so the two never interleave out of order) with
    the elapsed time and the ETA; ``enabled=False`` (ranks other than 0) prints nothing."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stdout, dynamic_ncols=True,
                mininterval=1.0, **kwargs)


def is_flow(schedule: Any) -> bool:
    from sidscale.core.schedule import FlowSchedule

    return isinstance(schedule, FlowSchedule)


def method_label(schedule: Any, generator_steps: int = 1) -> str:
    """The method the run uses, as the training bar names it: SiD-LSG for VP teachers, SiD-DiT (its
    flow-matching form) for flow teachers; K-step generators say K."""
    name = "sid-dit" if is_flow(schedule) else "sid-lsg"
    return name if generator_steps == 1 else f"{name} {generator_steps}-step"


def teacher_sampler_name(schedule: Any) -> str:
    """The teacher's own sampler (its family's ``teacher_sampler``): DDIM for VP teachers, the flow
    Euler sampler for flow teachers."""
    return "flow_euler" if is_flow(schedule) else "ddim"


SAMPLER_TITLES = {"ddim": "DDIM", "flow_euler": "flow Euler"}


def sampler_title(name: str) -> str:
    """``teacher_sampler_name``'s name as the terminal writes it."""
    return SAMPLER_TITLES.get(name, name)


def toy_eval_scalars(result: dict, generator_steps: int, sampler: str, teacher_steps: int) -> dict[str, float]:
    """TensorBoard scalars of a toy evaluation, named by what ran: ``eval/frechet_student_{K}_step``,
    ``eval/frechet_teacher_{sampler}_{S}_steps``, ``eval/frechet_exact_vs_exact`` (and the
    prompt / colour accuracies alike). ``result``: ``toy_quality``'s keys (``*_one_step`` holds the
    K-step student, ``*_teacher_ddim`` the teacher's own sampler, whatever it is)."""
    names = {"one_step": f"student_{generator_steps}_step", "teacher_ddim": f"teacher_{sampler}_{teacher_steps}_steps",
             "exact_vs_exact": "exact_vs_exact", "exact": "exact"}
    out = {}
    for key, value in result.items():
        for metric in ("frechet", "prompt_accuracy", "colour_accuracy"):
            if key.startswith(metric + "_") and key[len(metric) + 1:] in names:
                out[f"eval/{metric}_{names[key[len(metric) + 1:]]}"] = value
    return out
