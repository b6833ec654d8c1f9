"""Clamp the adversarial rows of the targets stepped in this step to ``[low, high]`` (PGD's box)."""

from __future__ import annotations

import lightning as L
import torch

from sage_lightning.errors import SageError


class ClampPerturbation(L.Callback):
    """After each optimizer step: ``param[rows] = clamp(param[rows], low, high)`` for stepped targets.

    SAGE_METHOD.md: delta in [-1, 1] for the latent search; [-2.5, 2.5] for prompt-slot embeddings.
    """

    def __init__(self, low: float = -1.0, high: float = 1.0) -> None:
        if not low < high:
            raise SageError(f"clamp range [{low}, {high}] is empty or reversed: give low < high, e.g. [-1, 1]")
        self.low, self.high = low, high

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rows = pl_module.stepped_targets.to(pl_module.device)
        if rows.numel():
            param = pl_module.adversarial_rows()
            param[rows] = param[rows].clamp(self.low, self.high)
