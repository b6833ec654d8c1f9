"""The constraints a run puts on a search's adversarial parameters, as a search sees them.

The callbacks layer enforces them after each step (``callbacks.ClampPerturbation``, ``callbacks.LatentProjection``);
each search names its own (``TargetSearch.constraints``), added to a run that lists none of their class; a search
that must know them beforehand (the local random baseline draws delta inside the box) reads them
here, so no search imports a callback.
"""

from __future__ import annotations


class BoxConstraint:
    """Marks a callback that keeps the adversarial rows in ``[low, high]`` (``callbacks.ClampPerturbation``)."""

    low: float
    high: float


def run_box(trainer) -> tuple[float, float] | None:
    """The box ``[low, high]`` every box constraint of the run keeps delta in (their intersection); None without one."""
    boxes = [c for c in getattr(trainer, "callbacks", None) or [] if isinstance(c, BoxConstraint)]
    if not boxes:
        return None
    return max(c.low for c in boxes), min(c.high for c in boxes)
