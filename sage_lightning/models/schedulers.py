"""Scheduler resolution: the families sage supports, a family from another scheduler's config, and a model's
scheduler read from its config alone (budgets and step counts come from its timesteps before weights load)."""

from __future__ import annotations

from functools import lru_cache

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from sage_lightning.errors import SageError
from sage_lightning.models.families import FAMILY_LOADERS
from sage_lightning.models.sources import check_source
from sage_lightning.models.tiny import TINY_SCHEDULERS

SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-trailing": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "dpm++-sde": DPMSolverMultistepScheduler,
    "pndm": PNDMScheduler,
}
# Config a scheduler name sets on top of the model's scheduler config.
SCHEDULER_OVERRIDES: dict[str, dict] = {
    "euler-trailing": {"timestep_spacing": "trailing"},  # "euler" keeps the model's spacing (SDXL: leading)
    "dpm++": {"algorithm_type": "dpmsolver++"},
    "dpm++-sde": {"algorithm_type": "sde-dpmsolver++"},
}


def make_scheduler(name: str, config: dict) -> SchedulerMixin:
    """A scheduler of family ``name`` (see ``SCHEDULERS``) from another scheduler's config."""
    key = name.lower()
    if key not in SCHEDULERS:
        raise SageError(f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[key].from_config(config, **SCHEDULER_OVERRIDES.get(key, {}))


def check_scheduler(scheduler: SchedulerMixin, source: str) -> SchedulerMixin:
    """The model's own scheduler if the sampler supports it (its noise, if any, is seeded per target and
    parity with diffusers' pipeline is tested); SageError otherwise, never a silent fallback."""
    supported = {cls.__name__ for cls in SCHEDULERS.values()}
    if type(scheduler).__name__ not in supported:
        raise SageError(
            f"model {source!r} ships {type(scheduler).__name__}, which sage does not support: set "
            f"model.init_args.scheduler to one of {', '.join(SCHEDULERS)}"
        )
    return scheduler


@lru_cache(maxsize=16)
def load_scheduler(source: str, scheduler: str | None = "ddim", local_files_only: bool = False) -> SchedulerMixin:
    """The scheduler :func:`load_diffusion` would use, from the scheduler's config alone (no weights):
    budgets and step counts come from its own timesteps before the model loads."""
    import diffusers

    for _, family_scheduler in FAMILY_LOADERS:  # each returns None for a source not its own
        if (family_own := family_scheduler(source, scheduler, local_files_only)) is not None:  # SD3 / FLUX first
            return family_own
    if source in TINY_SCHEDULERS:
        own: SchedulerMixin = TINY_SCHEDULERS[source]()
    else:
        path, is_local = check_source(source)
        try:
            config = diffusers.DDIMScheduler.load_config(  # any scheduler class reads scheduler_config.json
                str(path) if is_local else source, subfolder="scheduler", local_files_only=local_files_only or is_local
            )
        except (OSError, ValueError) as err:
            raise SageError(f"cannot read the scheduler of model {source!r}: check the hub id or folder") from err
        cls = getattr(diffusers, str(config.get("_class_name")), None)
        if cls is None:
            raise SageError(f"model {source!r} names an unknown scheduler {config.get('_class_name')!r}")
        own = cls.from_config(config)
    chosen = own if scheduler is None else make_scheduler(scheduler, own.config)
    return check_scheduler(chosen, source)

