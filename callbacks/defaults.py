"""The callbacks every search run gets unless the config lists its own: the per-pass checkpoint and the
search's progress bar (:class:`~sage_lightning.callbacks.progress.SearchProgressBar`).

The result writer is the search's own (``TargetSearch.result_writer``, added by its ``configure_callbacks``),
so the CLI never decides which writer a search gets.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar

from sage_lightning.callbacks.checkpoint import IterationCheckpoint
from sage_lightning.callbacks.progress import SearchProgressBar


def missing_run_callbacks(root: str | Path, given: list[L.Callback], progress_bar: bool = True) -> list[L.Callback]:
    """``IterationCheckpoint(root/checkpoints)`` unless ``given`` has a checkpoint callback, and
    ``SearchProgressBar()`` unless ``given`` has a progress bar or ``progress_bar`` is False (the trainer's
    ``enable_progress_bar: false``)."""
    missing: list[L.Callback] = []
    if not any(isinstance(c, ModelCheckpoint) for c in given):
        missing.append(IterationCheckpoint(dirpath=str(Path(root) / "checkpoints")))
    if progress_bar and not any(isinstance(c, ProgressBar) for c in given):
        missing.append(SearchProgressBar())
    return missing
