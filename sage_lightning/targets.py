"""A search target: one (class, prompt, seed) for which SAGE looks for a failure."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Target:
    """``index``: position in the run's target list (the id used everywhere in the run folder)."""

    index: int
    class_name: str
    prompt: str
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def seeded_latent(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The initial latent z0 ~ N(0, I) of a target: a function of its seed only (CPU generator)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)))
