"""Keep adversarial latents non-outliers of N(0, I): project z = z0 + delta onto the Gaussian shell."""

from __future__ import annotations

import math

import lightning as L
import torch


class LatentProjection(L.Callback):
    """After each step, for stepped targets: ``z <- z * sqrt(d) / |z|``, i.e. ``delta = z' - z0``.

    A sample of N(0, I) in d dimensions has ``|z| ~ sqrt(d)``; SAGE's latents must not be outliers.
    Put it after ``ClampPerturbation`` in the callback list so the shell constraint holds exactly.
    """

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rows = pl_module.stepped_targets.to(pl_module.device)
        if not rows.numel():
            return
        delta = pl_module.adversarial_rows()
        z0 = pl_module.initial_latents(rows)
        z = z0 + delta[rows]
        norms = z.flatten(1).norm(dim=1).view(-1, *([1] * (z.dim() - 1)))
        delta[rows] = z * (math.sqrt(z[0].numel()) / norms) - z0
