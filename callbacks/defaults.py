"""The callback every search run needs, whatever the config lists: the per-pass checkpoint.

The result writer is the search's own (``TargetSearch.result_writer``, added by its ``configure_callbacks``),
so the CLI never decides which writer a search gets.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.checkpoint import IterationCheckpoint


def missing_run_callbacks(root: str | Path, given: list[L.Callback]) -> list[L.Callback]:
    """``IterationCheckpoint(root/checkpoints)`` unless ``given`` has a checkpoint callback."""
    if any(isinstance(c, ModelCheckpoint) for c in given):
        return []
    return [IterationCheckpoint(dirpath=str(Path(root) / "checkpoints"))]
