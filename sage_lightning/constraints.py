"""The constraints a run puts on a search's adversarial parameters, as a search sees them.

The callbacks layer enforces them after each step (``sage_lightning.callbacks.ClampPerturbation``,
``sage_lightning.callbacks.LatentProjection``); each search names its own (``TargetSearch.constraints``), added
to a run that lists none of their class; a search that must know them beforehand (the local random baseline
draws delta inside the box) reads them here, so no search imports a callback.
"""

from __future__ import annotations

import torch
from torch import Tensor

BISECTION_STEPS = 60  # halves the bracket of the scale s down to float precision


class BoxConstraint:
    """Marks a callback that keeps the adversarial rows in ``[low, high]``
    (``sage_lightning.callbacks.ClampPerturbation``)."""

    low: float
    high: float


def run_box(trainer) -> tuple[float, float] | None:
    """The box ``[low, high]`` every box constraint of the run keeps delta in (their intersection); None without one."""
    boxes = [c for c in getattr(trainer, "callbacks", None) or [] if isinstance(c, BoxConstraint)]
    if not boxes:
        return None
    return max(c.low for c in boxes), min(c.high for c in boxes)


def sphere_in_box(z0: Tensor, delta: Tensor, low: float, high: float, radius: float) -> Tensor:
    """The delta (rows ``[B, ...]``) whose ``z = z0 + delta`` lies on |z| = ``radius`` with delta in ``[low, high]``.

    The path ``z(s) = z0 + clamp(s * w - z0, low, high)``, with ``w = z0 + clamp(delta)``, is the radial
    scaling of the sphere projection (``s = radius / |w|`` when no entry meets the box) bent along the box's
    faces; ``|z(s)|`` grows monotonically with ``s`` and ``z(1) = w``, so a bisection on ``s`` finds the point
    of the sphere on it. If the box cannot reach the sphere, the nearest end of the path is kept (box kept).
    """
    delta = delta.clamp(low, high)
    w = z0 + delta

    def norm(s: Tensor) -> Tensor:
        return (z0 + (s * w - z0).clamp(low, high)).flatten(1).norm(dim=1)

    shape = (-1, *([1] * (w.dim() - 1)))
    lo = torch.zeros(len(w), dtype=w.dtype, device=w.device).view(shape)
    hi = torch.ones_like(lo)
    while bool((norm(hi) < radius).any()) and float(hi.max()) < 1e6:  # widen until the bracket holds the sphere
        hi = torch.where(norm(hi).view(shape) < radius, hi * 2, hi)
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        below = norm(mid).view(shape) < radius
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    s = torch.where((norm(hi) - radius).abs().view(shape) <= (norm(lo) - radius).abs().view(shape), hi, lo)
    return (s * w - z0).clamp(low, high)
