"""The callbacks every search run needs, whatever the config lists: the per-pass checkpoint and the writer."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.checkpoint import IterationCheckpoint
from callbacks.failure_writer import FailureWriter


def missing_run_callbacks(root: str | Path, given: list[L.Callback]) -> list[L.Callback]:
    """``IterationCheckpoint(root/checkpoints)`` and ``FailureWriter`` unless ``given`` has them."""
    extra: list[L.Callback] = []
    if not any(isinstance(c, ModelCheckpoint) for c in given):
        extra.append(IterationCheckpoint(dirpath=str(Path(root) / "checkpoints")))
    if not any(isinstance(c, FailureWriter) for c in given):
        extra.append(FailureWriter())
    return extra
