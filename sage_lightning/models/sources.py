"""Where a model source points: a world's shipped folder, a local ``save_pretrained`` folder, a hub id or a tiny
stack. Missing folders are named at once, before anything loads."""

from __future__ import annotations

import os
from pathlib import Path

from sage_lightning.errors import SageError
from sage_lightning.models.tiny import TINY_SOURCES
from sage_lightning.worlds import find_world, world_names


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith((".", "/", "~"))
        or os.sep in source.strip("/").split("/", 1)[-1]
        or Path(source).expanduser().exists()
    )


def _named_sources() -> str:
    """The sources known by name, for messages: "'shapesworld', 'tiny' or 'tiny-xl'"."""
    names = [repr(name) for name in [*world_names(), *TINY_SOURCES]]
    return f"{', '.join(names[:-1])} or {names[-1]}"


def check_source(source: str) -> tuple[Path, bool]:
    """Where ``source`` points and whether it is local; SageError at once for a missing folder."""
    if source in TINY_SOURCES:
        return Path(), True
    world = find_world(source)
    if world is not None:
        path = world.weights / "pipeline"
        if not (path / "model_index.json").exists():
            raise SageError(
                f"{world.title} weights are missing at {path}: reinstall sage-lightning or rebuild them "
                f"with {world.rebuild}"
            )
        return path, True
    path = Path(source).expanduser()
    is_local = _looks_like_path(source)
    if is_local and not (path / "model_index.json").exists():
        why = "does not exist" if not path.exists() else "has no model_index.json"
        raise SageError(
            f"model folder {str(path)!r} {why}: pass a folder written by save_pretrained, a hub id, "
            f"{_named_sources()}"
        )
    return path, is_local


def check_lm_source(source: str) -> tuple[Path, bool]:
    """Where a causal language model ``source`` points and whether it is local (a world's name: the world's
    own LM); SageError at once for a missing folder."""
    world = find_world(source)
    if world is not None:
        path = world.weights / "lm"
        if not (path / "config.json").exists():
            raise SageError(f"{world.title}'s language model is missing at {path}: reinstall sage-lightning")
        return path, True
    path = Path(source).expanduser()
    local = source.startswith((".", "/", "~")) or path.exists()
    if local and not (path / "config.json").exists():
        raise SageError(f"language model folder {source!r} does not exist or has no config.json")
    return path, local


def load_error(what: str, source: str, err: Exception) -> SageError:
    """One line for a hub id or folder that does not load: the first line of the library's reason."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return SageError(
        f"cannot load {what} {source!r} ({first[:200]}): check the hub id or folder, or your network / "
        "`local_files_only`"
    )
