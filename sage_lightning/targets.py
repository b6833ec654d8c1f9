"""A search target: one (class, prompt, seed) for which SAGE looks for a failure."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Target:
    """``index``: position in the run's target list (the id used everywhere in the run folder). ``class_index``:
    the class as an index into D's class list, carried from the config on (class names can repeat, e.g. open_clip's
    ImageNet names "missile" 657 and 744, so a name never identifies the class); None: resolve ``class_name``."""

    index: int
    class_name: str
    prompt: str
    seed: int
    class_index: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def seeded_latent(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The initial latent z0 ~ N(0, I) of a target: a function of its seed only (CPU generator)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)))


def noise_generator(seed: int, shape: tuple[int, ...]) -> torch.Generator:
    """The generator of a target's scheduler noise (ancestral/SDE solvers, DDIM with eta > 0).

    Seeded with the target's seed and advanced past its z0 draw, so that z0 and every step's noise are
    the draws ``StableDiffusionPipeline(generator=torch.Generator().manual_seed(seed))`` makes. A fresh one
    per generation: the noise is a fixed function of the target, the same at every iteration and in
    every gradient mode.
    """
    generator = torch.Generator().manual_seed(int(seed))
    torch.randn(shape, generator=generator)  # z0's draw
    return generator
