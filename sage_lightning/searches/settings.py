"""The settings a search checks and the defaults it takes: iteration budgets, the constraint boxes, SDXL's
micro-conditioning and the targets' class indices (imported through :mod:`sage_lightning.searches.base` too)."""

from __future__ import annotations

import dataclasses
import importlib
import math

from sage_lightning.errors import SageError
from sage_lightning.flow_models import is_tiny_source
from sage_lightning.models import DiffusionModel, DiffusionXLModel
from sage_lightning.targets import Target

PAPER_ITERATIONS = 100  # SAGE's pseudo-code: at most 100 sign-gradient iterations per target
CPU_WORLD_ITERATIONS = 20  # ShapesWorld and the tiny stack: a budget that runs in minutes on a CPU


def default_max_iterations(diffusion: str) -> int:
    """The iteration budget a model gets when its config names none: the paper's 100, except on the CPU worlds
    (``shapesworld``, ``tiny``, ``tiny-xl``, ``tiny-sd3``, ``tiny-flux``), where 20 keeps a run to minutes on a CPU."""
    cpu_world = diffusion == "shapesworld" or is_tiny_source(diffusion)
    return CPU_WORLD_ITERATIONS if cpu_world else PAPER_ITERATIONS


MAX_GUIDANCE = 100.0  # larger scales overflow float32 images into NaN


def check_guidance(guidance_scale: float, true_cfg_scale: float) -> None:
    """SageError unless both guidance scales are finite numbers in [0, :data:`MAX_GUIDANCE`]."""
    for name, value in (("guidance_scale", guidance_scale), ("true_cfg_scale", true_cfg_scale)):
        if not (math.isfinite(value) and 0 <= value <= MAX_GUIDANCE):
            raise SageError(f"{name}={value} must be in [0, {MAX_GUIDANCE:g}] (Stable Diffusion uses 7.5; 1 or less "
                            "disables guidance)")


LATENT_BOX = (-1.0, 1.0)  # METHOD.md: the latent perturbation delta is clamped to [-1, 1]
EMBEDDING_BOX = (-2.5, 2.5)  # SAGE's pseudo-code: the prompt slots' (and the token's) embeddings in [-2.5, 2.5]


def clamp_constraint(box: tuple[float, float]) -> tuple[str, dict]:
    """The constraint that keeps the adversarial rows in ``box`` (``sage_lightning.callbacks.ClampPerturbation``), for
    :meth:`TargetSearch.constraints`."""
    return "sage_lightning.callbacks.clamp.ClampPerturbation", {"low": box[0], "high": box[1]}


def import_class(path: str) -> type:
    """The class at ``module.Name`` (a search names its callbacks this way: no import of an upper layer)."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


MICRO_CONDITIONING = ("original_size", "crops_coords_top_left", "target_size")


def check_micro_conditioning(given: dict | None) -> dict[str, tuple[int, int]]:
    """SDXL's ``micro_conditioning`` setting as pairs of non-negative integers; SageError naming a bad key or value."""
    checked: dict[str, tuple[int, int]] = {}
    for key, value in (given or {}).items():
        if key not in MICRO_CONDITIONING:
            raise SageError(f"micro_conditioning has no key {key!r}: use {', '.join(MICRO_CONDITIONING)}")
        pair = list(value) if isinstance(value, (list, tuple)) else [value]
        if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pair):
            raise SageError(f"micro_conditioning.{key}={value!r} must be two non-negative integers, e.g. [1024, 1024]")
        checked[key] = (pair[0], pair[1])
    return checked


def with_micro_conditioning(model: DiffusionModel, values: dict[str, tuple[int, int]]) -> DiffusionModel:
    """``model`` with SDXL's size conditioning set; SageError for a model without it (not SDXL)."""
    if not isinstance(model, DiffusionXLModel):
        raise SageError(f"micro_conditioning is SDXL's size conditioning; {model.name!r} is not an SDXL model: "
                        "remove micro_conditioning from the config")
    return dataclasses.replace(model, **values)


def target_class_indices(targets: list[Target], known: list[str]) -> list[int]:
    """Each target's class as an index into ``known``: the index it carries (never looked up by name: names can
    repeat), else its name resolved (SageError when the name is unknown or ambiguous)."""
    from sage_lightning.surrogate import resolve_classes

    return [t.class_index if t.class_index is not None else resolve_classes([t.class_name], known)[0]
            for t in targets]


