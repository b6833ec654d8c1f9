"""Clamp the adversarial rows of the targets stepped in this step to ``[low, high]`` (PGD's box)."""

from __future__ import annotations

import math

import lightning as L
import torch

from sage_lightning.constraints import BoxConstraint
from sage_lightning.errors import SageError

MAX_BOUND = 100.0  # latents are N(0, 1) and token embeddings have norms near 1


class ClampPerturbation(BoxConstraint, L.Callback):
    """After each optimizer step: ``param[rows] = clamp(param[rows], low, high)`` for stepped targets.

    METHOD.md: delta in [-1, 1] for the latent search; [-2.5, 2.5] for prompt-slot embeddings.
    """

    def __init__(self, low: float = -1.0, high: float = 1.0) -> None:
        if not (math.isfinite(low) and math.isfinite(high) and max(abs(low), abs(high)) <= MAX_BOUND):
            raise SageError(
                f"clamp range [{low}, {high}] is too wide: bounds within [-{MAX_BOUND:g}, {MAX_BOUND:g}] "
                "(SAGE uses [-1, 1] for latents, [-2.5, 2.5] for embeddings)"
            )
        if not low < high:
            raise SageError(f"clamp range [{low}, {high}] is empty or reversed: give low < high, e.g. [-1, 1]")
        self.low, self.high = low, high

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rows = pl_module.stepped_targets.to(pl_module.device)
        if rows.numel():
            param = pl_module.adversarial_rows()
            param[rows] = param[rows].clamp(self.low, self.high)
