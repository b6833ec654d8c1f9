"""Run-folder policy of ``sage fit``: which folder a run writes to, when a run there may start or resume, and
the report it leaves (the files themselves are :mod:`sage_lightning.results`' job).

* a folder that cannot be created or written is refused before anything is built (:func:`check_run_folder`);
* a folder that holds results resumes only with ``--ckpt_path last`` and, before its first checkpoint, only with
  the config that wrote them (:func:`fit_checkpoint`, :func:`config_difference`);
* a run's ``config.yaml`` given from a copied or moved run folder resumes that copy (:func:`copied_run_folder`);
* a run that fails to start leaves no empty folders behind (:class:`NewFolders`);
* a run that ends (or is interrupted) leaves ``report.html`` (:func:`write_run_report`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from sage_lightning.errors import SageError
from sage_lightning.results import RESULTS

RUN_MARKERS = ("checkpoints", RESULTS, "logs")
# What decides a run's results: a restart that keeps a run's result lines must have the same values here.
RESULT_KEYS = ("seed_everything", "model", "data", "optimizer", "lr_scheduler", "trainer.callbacks")


def _flat(value, key: str) -> dict[str, object]:
    """``{dotted key: leaf value}`` of a config part (lists are leaves)."""
    if isinstance(value, dict) and value:
        return {k: v for name, item in value.items() for k, v in _flat(item, f"{key}.{name}").items()}
    return {key: value}


def _part(config: dict, key: str):
    for name in key.split("."):
        config = config.get(name) if isinstance(config, dict) else None
    return config


def config_difference(saved: dict, new: dict) -> tuple[str, object, object] | None:
    """The first key of :data:`RESULT_KEYS` (dotted, to the leaf) whose value differs, with both values."""
    for key in RESULT_KEYS:
        before, after = _flat(_part(saved, key), key), _flat(_part(new, key), key)
        for leaf in [*after, *(k for k in before if k not in after)]:
            if before.get(leaf) != after.get(leaf):
                return leaf, before.get(leaf), after.get(leaf)
    return None


def _brief(value, longest: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= longest else f"{text[: longest - 3]}..."


def check_same_config(root: Path, new: dict) -> None:
    """A restart that keeps ``root``'s result lines must run the config that wrote them (its config.yaml);
    ``new``: the config given now, as a plain dict."""
    saved_path = root / "config.yaml"
    if not saved_path.is_file():
        raise SageError(
            f"run folder {str(root)!r} holds results.jsonl but no config.yaml, so the config that wrote them is "
            "unknown: choose a new folder with --trainer.default_root_dir"
        )
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise SageError(f"{str(saved_path)!r} is unreadable ({type(err).__name__}): choose a new folder") from err
    differ = config_difference(saved, new)
    if differ is not None:
        key, before, after = differ
        raise SageError(
            f"run folder {str(root)!r} holds results of another config ({key}: {_brief(before)} there, "
            f"{_brief(after)} now): "
            f"finish that run with its own config, sage fit --config {saved_path} --ckpt_path last, or start this "
            "one in a new folder (--trainer.default_root_dir)"
        )


def check_checkpoint(path: Path) -> None:
    """SageError for a checkpoint that is missing, truncated or not a sage checkpoint."""
    if not path.is_file():
        raise SageError(f"checkpoint {str(path)!r} does not exist: check --ckpt_path or start without it")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: name it, do not dump the unpickler's trace
        raise SageError(
            f"checkpoint {str(path)!r} is unreadable ({type(err).__name__}): it is corrupt or not a sage "
            "checkpoint; resume from another one or start the run afresh in a new folder"
        ) from err


def fit_checkpoint(root: Path, ckpt: str | None, new_config: Callable[[], dict]) -> str | None:
    """The checkpoint ``sage fit`` starts from in run folder ``root`` (None: from the beginning), checked.

    A folder with results needs ``ckpt`` (``last`` or a path); ``last`` before the first checkpoint starts the
    run again, which redoes exactly what it did when ``new_config()`` is the config that wrote the results
    (checked), so the result lines already written are not repeated.
    """
    if ckpt is None and (root / RESULTS).exists():
        raise SageError(
            f"run folder {str(root)!r} already holds results.jsonl: resume it with --ckpt_path last, or "
            "choose a new folder with --trainer.default_root_dir"
        )
    if ckpt == "last":
        ckpt = str(root / "checkpoints" / "last.ckpt")
        if not Path(ckpt).is_file():  # killed before its first checkpoint: the run starts again
            if (root / RESULTS).exists():
                check_same_config(root, new_config())
            print(f"sage: {str(root)!r} holds no checkpoint yet: the run starts from the beginning", file=sys.stderr)
            return None
    if ckpt is not None:
        check_checkpoint(Path(ckpt))
    return ckpt


def check_run_folder(root: Path) -> None:
    """Refuse a run folder that cannot be created or written (before anything is built or written)."""
    for folder in (root.absolute(), *root.absolute().parents):
        if not folder.exists():
            continue
        if not folder.is_dir():
            raise SageError(
                f"run folder {str(root)!r} cannot be created: {str(folder)!r} is a file; choose another "
                "--trainer.default_root_dir"
            )
        if not os.access(folder, os.W_OK | os.X_OK):
            raise SageError(f"run folder {str(root)!r} cannot be written: {str(folder)!r} is not writable")
        return


def copied_run_folder(config_files: list, root: Path) -> Path | None:
    """The folder of a run's ``config.yaml`` given with ``--config`` when that run was copied or moved there
    (its stored run folder is elsewhere and the command names no other one): the copy resumes itself."""
    for given in config_files:
        path = Path(getattr(given, "absolute", None) or str(given))
        if path.name != "config.yaml" or not any((path.parent / m).exists() for m in RUN_MARKERS):
            continue
        try:
            stored = (yaml.safe_load(path.read_text()) or {}).get("trainer", {}).get("default_root_dir")
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if stored and Path(stored).absolute() == root.absolute() and root.resolve() != path.parent.resolve():
            return path.parent
    return None


class NewFolders:
    """The folders a run creates around its run folder, so that a run that fails to start can remove them."""

    def __init__(self) -> None:
        self.root: Path | None = None
        self.existing: set[Path] = set()

    def watch(self, root: Path) -> None:
        """Note what exists now around ``root`` (the run folder, its parents, the folders inside it)."""
        self.root = root.absolute()
        top = next((p for p in (self.root, *self.root.parents) if p.exists()), None)
        inside = {p for p in top.rglob("*") if p.is_dir()} if top == self.root else set()
        self.existing = {top, *top.parents, *inside}

    def remove_new_empty_folders(self) -> None:
        """Undo the empty folders (logs/version_N, the run folder) made by a run that failed to start."""
        if self.root is None:
            return
        candidates = [p for p in self.root.rglob("*") if p.is_dir()] if self.root.is_dir() else []
        candidates += [self.root, *self.root.parents]
        for folder in sorted(candidates, key=lambda p: len(p.parts), reverse=True):
            try:
                if folder not in self.existing and folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
            except OSError:  # removed or filled meanwhile: leave it
                continue


def write_run_report(root: Path) -> None:
    """``root/report.html`` at the end of ``sage fit`` (rank 0). A report that cannot be written never fails the
    run: one line says why and how to write it later."""
    if not (root / RESULTS).is_file():
        return
    from sage_lightning.report import write_report

    try:
        path = write_report(root)
    except Exception as err:  # the search's results are safe on disk; the page is a view of them
        print(f"sage: report not written ({type(err).__name__}: {' '.join(str(err).split())[:200]}); write it "
              f"with: sage report {root}", file=sys.stderr)
        return
    print(f"Report: {path.resolve()}")
