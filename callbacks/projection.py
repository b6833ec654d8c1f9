"""Keep adversarial latents non-outliers of N(0, I): move z = z0 + delta onto the Gaussian shell |z| = sqrt(d),
inside the run's box for delta (SAGE_METHOD.md, "Latent-space search": delta clamped, z a non-outlier)."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor

from sage_lightning.constraints import run_box, sphere_in_box


def shell_in_box(z0: Tensor, delta: Tensor, low: float, high: float) -> Tensor:
    """The delta (rows ``[B, ...]``) whose ``z = z0 + delta`` lies on |z| = sqrt(d) with delta in ``[low, high]``
    (:func:`~sage_lightning.constraints.sphere_in_box` at radius sqrt(d))."""
    return sphere_in_box(z0, delta, low, high, math.sqrt(delta[0].numel()))


class LatentProjection(L.Callback):
    """After each step, for stepped targets: z onto the shell |z| = sqrt(d), delta kept in the run's box.

    A sample of N(0, I) in d dimensions has ``|z| ~ sqrt(d)``; SAGE's latents must not be outliers. When the
    run also has a :class:`~callbacks.ClampPerturbation`, the projection moves along the box
    (:func:`shell_in_box`) instead of scaling z freely, so the step's result satisfies both constraints
    whatever the order of the two callbacks (the clamp then finds delta already inside its box).
    """

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rows = pl_module.stepped_targets.to(pl_module.device)
        if not rows.numel():
            return
        delta = pl_module.adversarial_rows()
        z0 = pl_module.initial_latents(rows)
        box = run_box(trainer)
        if box is None:
            z = z0 + delta[rows]
            norms = z.flatten(1).norm(dim=1).view(-1, *([1] * (z.dim() - 1)))
            delta[rows] = z * (math.sqrt(z[0].numel()) / norms) - z0
        else:
            delta[rows] = shell_in_box(z0, delta[rows], *box)
