"""Worlds: model sources that ship their own weights, discriminator, judge and class synonyms (ShapesWorld).

A world is a plugin package above every other layer: it imports the model layer (to build its members, load its
pipeline), never the other way round. The lower layers reach a world only through this registry, by name. The
worlds shipped with the package are declared here as data (``BUILTIN``: name -> module path); importing that
module registers the world (``register_world``), so looking a world up imports it on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# The worlds that ship with sage-lightning: name -> the module that registers it (imported on first look-up).
BUILTIN: dict[str, str] = {"shapesworld": "sage_lightning.shapesworld.plugin"}
# The world whose class names the random ``tiny`` stacks' debugging ensemble uses.
DEFAULT_WORLD = "shapesworld"


@dataclass(frozen=True)
class World:
    """What a world provides to the model layer, the searches and the analyses.

    Attributes:
        name: the model source name a config gives (``diffusion: shapesworld``).
        title: the name in messages ("ShapesWorld").
        weights: the shipped folder: ``pipeline/`` (diffusers), ``lm/`` (causal LM), ``clip/``, ``classifiers/``.
        rebuild: the command that rebuilds missing weights, as messages quote it.
        class_names: the world's classes in index order.
        synonyms: class name -> the words a prompt search must not append for it.
        default_ensemble: builds the discriminator D a config that names none gets.
        judge: images (float ``[N, 3, H, W]`` in [0, 1], or uint8 ``[N, H, W, 3]``) -> the class each shows
            (None where it shows none).
        clip_processor: ``(clip folder, image size) -> CLIPProcessor`` for a CLIP folder saved without one.
    """

    name: str
    title: str
    weights: Path
    rebuild: str
    class_names: tuple[str, ...]
    synonyms: Mapping[str, Sequence[str]]
    default_ensemble: Callable[[], object]
    judge: Callable[[object], list[str | None]]
    clip_processor: Callable[[Path, int], object]


_REGISTERED: dict[str, World] = {}


def register_world(world: World) -> World:
    """Make ``world`` known by its name (a world's plugin module calls this when it is imported)."""
    _REGISTERED[world.name] = world
    return world


def find_world(name: str) -> World | None:
    """The world called ``name`` (a built-in one is imported on first use), or None if there is none."""
    if name not in _REGISTERED and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    return _REGISTERED.get(name)


def all_worlds() -> list[World]:
    """Every world: the built-in ones (imported if needed) and any other registered one."""
    for name in BUILTIN:
        find_world(name)
    return list(_REGISTERED.values())


def world_names() -> list[str]:
    """The names of the built-in worlds (without importing them)."""
    return list(BUILTIN)
