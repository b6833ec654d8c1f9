"""Collectives of a search under DDP: every rank calls them at the same point, and every rank ends the same way
(imported through :mod:`sage_lightning.searches.base` too)."""

from __future__ import annotations

import torch.distributed as dist

from sage_lightning.errors import SageError

DIVERGED = ": the search diverged (lower lr or guidance_scale); the run stops before anything non-finite is written"


def raise_on_every_rank(problem: str, why: str = DIVERGED) -> None:
    """Collective: every rank calls it with its own ``problem`` ("" for none). If any rank has one, every rank
    raises the same SageError (the first problem in rank order, then ``why``), so no rank goes on alone, waits
    on the others or ends with another message."""
    first = next((p for p in all_gather_objects([problem]) if p), "")
    if first:
        raise SageError(f"{first}{why}")


def all_gather_objects(items: list) -> list:
    """Every rank's ``items`` concatenated, in rank order (``items`` itself without DDP)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list[list | None] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, items)
        return [item for part in everyone for item in (part or [])]
    return items


