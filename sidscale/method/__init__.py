"""SiD (SiD-LSG / SiD-DiT): guidance, losses, guards and the two steps. Networks and tensors only."""

from sidscale.method.guidance import EpsFn, guided_eps
from sidscale.method.sid_lsg import (
    MethodSettings,
    StepNoise,
    apply_prompt_dropout,
    fake_step,
    generate,
    generator_step,
    multi_step_generate,
    one_step_generate,
)

__all__ = [
    "EpsFn", "guided_eps", "MethodSettings", "StepNoise", "apply_prompt_dropout",
    "fake_step", "generate", "generator_step", "multi_step_generate", "one_step_generate",
]
