"""Sampler names for the command line, each a diffusers scheduler built from a pipeline's config."""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

# name -> (scheduler class, config overrides). All share the pipeline's noise schedule and
# prediction type through `from_config`.
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++3m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "dpm++sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
}


def make_scheduler(name: str, config: dict) -> SchedulerMixin:
    """Build the scheduler called ``name`` from another scheduler's ``config``.

    Raises:
        ValueError: for an unknown name; the message lists the known ones.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(config, **overrides)
