"""Keep adversarial latents non-outliers of N(0, I): move z = z0 + delta onto the Gaussian shell |z| = sqrt(d),
inside the run's box for delta (SAGE_METHOD.md, "Latent-space search": delta clamped, z a non-outlier)."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor

from sage_lightning.constraints import run_box

BISECTION_STEPS = 60  # halves the bracket of the scale s down to float precision


def shell_in_box(z0: Tensor, delta: Tensor, low: float, high: float) -> Tensor:
    """The delta (rows ``[B, ...]``) whose ``z = z0 + delta`` lies on |z| = sqrt(d) with delta in ``[low, high]``.

    The path ``z(s) = z0 + clamp(s * w - z0, low, high)``, with ``w = z0 + clamp(delta)``, is the radial
    scaling of the shell projection (``s = sqrt(d) / |w|`` when no entry meets the box) bent along the box's
    faces; ``|z(s)|`` grows monotonically with ``s`` and ``z(1) = w``, so a bisection on ``s`` finds the point
    of the shell on it. If the box cannot reach the shell, the nearest end of the path is kept (box kept).
    """
    delta = delta.clamp(low, high)
    w = z0 + delta
    radius = math.sqrt(w[0].numel())

    def norm(s: Tensor) -> Tensor:
        return (z0 + (s * w - z0).clamp(low, high)).flatten(1).norm(dim=1)

    shape = (-1, *([1] * (w.dim() - 1)))
    lo = torch.zeros(len(w), dtype=w.dtype, device=w.device).view(shape)
    hi = torch.ones_like(lo)
    while bool((norm(hi) < radius).any()) and float(hi.max()) < 1e6:  # widen until the bracket holds the shell
        hi = torch.where(norm(hi).view(shape) < radius, hi * 2, hi)
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        below = norm(mid).view(shape) < radius
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    s = torch.where((norm(hi) - radius).abs().view(shape) <= (norm(lo) - radius).abs().view(shape), hi, lo)
    return (s * w - z0).clamp(low, high)


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
