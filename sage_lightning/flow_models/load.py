"""Loading SD3 and FLUX: a ``StableDiffusion3Pipeline`` / ``FluxPipeline`` folder or hub id, or a tiny stack.

:func:`sage_lightning.models.load_diffusion` hands a source here first (:func:`load_flow`); a source that is
not a flow-matching model comes back as ``None`` and loads as before. A folder or hub id is told apart by the
``_class_name`` of its ``model_index.json``. Local files first: a hub id is read from the local cache, and the
hub is asked only when that fails (never with ``local_files_only``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

from sage_lightning.errors import SageError
from sage_lightning.flow_models.records import FlowModel, FluxModel, SD3Model
from sage_lightning.flow_models.tiny import build_tiny_flux, build_tiny_sd3, flux_scheduler, sd3_scheduler
from sage_lightning.models.families import FAMILY_LOADERS
from sage_lightning.models.pipelines import _resolve_dtype
from sage_lightning.models.sources import check_source
from sage_lightning.models.sources import load_error as _load_error
from sage_lightning.models.tiny import TINY_SOURCES
from sage_lightning.worlds import find_world

# Built-in flow-matching sources with random weights: name -> (builder(seed=...), its scheduler).
FLOW_TINY_SOURCES: dict[str, tuple[Callable[..., FlowModel], Callable[[], FlowMatchEulerDiscreteScheduler]]] = {
    "tiny-sd3": (build_tiny_sd3, sd3_scheduler),
    "tiny-flux": (build_tiny_flux, flux_scheduler),
}


def is_tiny_source(source: str) -> bool:
    """Whether ``source`` names a built-in stack of random weights (UNet or flow): tests and debugging only."""
    return source in TINY_SOURCES or source in FLOW_TINY_SOURCES


FLOW_PIPELINES = {StableDiffusion3Pipeline.__name__: SD3Model, FluxPipeline.__name__: FluxModel}
# Scheduler names a flow model accepts: None keeps the model's own; "flow-euler" rebuilds it from its config.
FLOW_SCHEDULERS = (None, "flow-euler")


def _local_first(read: Callable[[bool], object], offline_only: bool):
    """``read(local_files_only)`` from local files (a folder or the hub cache) first; from the hub only when that
    fails and ``offline_only`` is False (the local failure is raised when there is no second try)."""
    try:
        return read(True)
    except (OSError, ValueError):
        if offline_only:
            raise
    return read(False)


@lru_cache(maxsize=32)
def _model_index(source: str, local_files_only: bool) -> tuple[dict | None, str, bool]:
    """``(model_index.json or None, where to load from, offline only)``, read once per source: family detection,
    loading and the scheduler's config all ask here (callers only read the dict)."""
    path, is_local = check_source(source)
    where, offline_only = (str(path) if is_local else source), local_files_only or is_local
    try:
        index = _local_first(lambda local: StableDiffusion3Pipeline.load_config(where, local_files_only=local),
                             offline_only)
    except (OSError, ValueError):
        return None, where, offline_only
    return index, where, offline_only


def flow_family(source: str, local_files_only: bool = False) -> type[FlowModel] | None:
    """``SD3Model`` or ``FluxModel`` for a flow source (from its name or ``model_index.json``, :func:`_model_index`;
    no weights), None for any other source (a world, a tiny UNet stack, a UNet pipeline): the one test of whether a
    source is ours."""
    if source in FLOW_TINY_SOURCES:
        return SD3Model if source == "tiny-sd3" else FluxModel
    if source in TINY_SOURCES or find_world(source) is not None:
        return None
    index, _, _ = _model_index(source, local_files_only)
    return FLOW_PIPELINES.get(index.get("_class_name")) if index is not None else None


def is_flow_source(source: str, local_files_only: bool = False) -> bool:
    """Whether ``source`` is a tiny flow stack or a folder / hub id of an SD3 or FLUX pipeline."""
    return flow_family(source, local_files_only) is not None


def flow_scheduler(scheduler: FlowMatchEulerDiscreteScheduler, name: str | None, source: str):
    """The scheduler a flow model samples with: its own (``None``) or rebuilt from its config (``"flow-euler"``);
    SageError for any other name (DDIM, Euler and the rest are for noise-prediction UNets)."""
    if name not in FLOW_SCHEDULERS:
        raise SageError(
            f"model {source!r} is a flow-matching transformer: set model.init_args.scheduler to null or "
            f"'flow-euler', not {name!r}"
        )
    if type(scheduler) is not FlowMatchEulerDiscreteScheduler:
        raise SageError(f"model {source!r} ships {type(scheduler).__name__}: sage samples SD3 / FLUX with "
                        "FlowMatchEulerDiscreteScheduler only")
    if scheduler.config.get("stochastic_sampling"):
        raise SageError(f"model {source!r} sets stochastic_sampling: sage samples the flow ODE deterministically")
    return scheduler if name is None else FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)


def load_flow_scheduler(source: str, scheduler: str | None, local_files_only: bool = False):
    """The scheduler :func:`load_flow` would use, from the scheduler's config alone (no weights)."""
    if source in FLOW_TINY_SOURCES:
        return flow_scheduler(FLOW_TINY_SOURCES[source][1](), scheduler, source)
    _, where, offline_only = _model_index(source, local_files_only)
    try:
        config = _local_first(lambda local: FlowMatchEulerDiscreteScheduler.load_config(
            where, subfolder="scheduler", local_files_only=local), offline_only)
    except (OSError, ValueError) as err:
        raise _load_error("the scheduler of model", source, err) from err
    return flow_scheduler(FlowMatchEulerDiscreteScheduler.from_config(config), scheduler, source)


def _load_pipeline(source: str, index: dict, where: str, offline_only: bool) -> FlowModel:
    """The SD3 or FLUX pipeline at ``where`` as its record (local files first)."""
    record = FLOW_PIPELINES[index["_class_name"]]
    pipeline_class = StableDiffusion3Pipeline if record is SD3Model else FluxPipeline
    try:
        pipe = _local_first(lambda local: pipeline_class.from_pretrained(where, local_files_only=local), offline_only)
    except (OSError, ValueError) as err:
        raise _load_error("model", source, err) from err
    t5_tokenizer = pipe.tokenizer_3 if record is SD3Model else pipe.tokenizer_2
    length = min(record.max_sequence_length, int(getattr(t5_tokenizer, "model_max_length", 512)))
    parts = {name: getattr(pipe, name) for name in ("transformer", "vae", "text_encoder", "tokenizer",
                                                     "text_encoder_2", "tokenizer_2", "scheduler")}
    if record is SD3Model:
        if pipe.text_encoder_3 is None:
            raise SageError(f"model {source!r} has no T5 text encoder (text_encoder_3): sage needs all three")
        parts.update(text_encoder_3=pipe.text_encoder_3, tokenizer_3=pipe.tokenizer_3)
    return record(**parts, name=source, max_sequence_length=length)


def load_flow(
    source: str,
    *,
    scheduler: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    local_files_only: bool = False,
    seed: int = 0,
) -> FlowModel | None:
    """An SD3 or FLUX model, frozen, in ``dtype`` on ``device``; ``None`` when ``source`` is neither (a UNet model).

    ``source``: ``"tiny-sd3"`` / ``"tiny-flux"`` (random weights, ``seed``), a folder saved by ``save_pretrained``
    of a ``StableDiffusion3Pipeline`` / ``FluxPipeline``, or a hub id such as
    ``"stabilityai/stable-diffusion-3-medium-diffusers"`` or ``"black-forest-labs/FLUX.1-dev"``.
    ``scheduler``: ``None`` or ``"flow-euler"`` (:func:`flow_scheduler`).
    """
    if not is_flow_source(source, local_files_only):
        return None
    torch_dtype = _resolve_dtype(dtype)
    if source in FLOW_TINY_SOURCES:
        model = FLOW_TINY_SOURCES[source][0](seed=seed)
    else:
        model = _load_pipeline(source, *_model_index(source, local_files_only))
    model.scheduler = flow_scheduler(model.scheduler, scheduler, source)
    return model.freeze().to(device, None if torch_dtype == torch.float32 else torch_dtype)


def family_scheduler(source: str, scheduler: str | None, local_files_only: bool = False):
    """:func:`load_flow_scheduler` for an SD3 / FLUX source; None for any other (``models.load_scheduler``'s hook)."""
    if not is_flow_source(source, local_files_only):
        return None
    return load_flow_scheduler(source, scheduler, local_files_only)


if (load_flow, family_scheduler) not in FAMILY_LOADERS:  # models.load_diffusion / load_scheduler ask us first
    FAMILY_LOADERS.append((load_flow, family_scheduler))
