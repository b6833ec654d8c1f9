"""D's failure verdict over a latent's neighbourhood (ours, METHOD.md, "The neighbourhood check"; issue 19).

A sign-gradient search through the sampler finds two kinds of points where D fails: regions where the generator
really draws something else (a blob, a second shape, nothing), and isolated points where the image is still the
class and only D has been talked out of it (an adversarial example against D, not a failure of the generator).
The second kind is brittle: a small re-draw of the latent gives back an image D recognises. So a latent search can
ask D about the neighbourhood before it declares a failure: with :class:`NeighbourhoodCheck`, a target whose image
fails D is *found* only when D also fails on at least ``min_failing`` of ``draws`` re-draws
``z' = shell(z + sigma * eps)`` (the Gaussian shell ``|z'| = sqrt(d)``, as the search's own projection); otherwise
the search goes on from ``z``. This is D smoothed over the generator's latent neighbourhood, as the prompt search
already judges a prompt by a majority over seeds. Every draw is a function of (target seed, iteration) only, so a
resumed or DDP run draws what a one-device run draws; its images are forwards only, charged in forward-equivalents
(:meth:`NeighbourhoodCheck.images`) on top of the search's own cost.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sage_lightning.errors import SageError
from sage_lightning.surrogate.ensemble import EnsembleOutput

NEIGHBOUR_SEED_STRIDE = 7_919  # a target's draws at iteration i come from seed * stride + i, its own stream


@dataclass(frozen=True)
class NeighbourhoodCheck:
    """Settings of the check: ``draws`` re-draws at relative scale ``sigma`` (N(0, I) entries have std 1), of
    which at least ``min_failing`` must fail D for the failure to count."""

    draws: int = 6
    sigma: float = 0.1
    min_failing: int = 5

    def __post_init__(self) -> None:
        if self.draws < 1:
            raise SageError(f"failure_check.draws={self.draws} must be >= 1 (e.g. 6), or failure_check: null for none")
        if not 0 < self.sigma <= 1:
            raise SageError(f"failure_check.sigma={self.sigma} must be in (0, 1] (e.g. 0.1: a tenth of N(0, I)'s std)")
        if not 1 <= self.min_failing <= self.draws:
            raise SageError(f"failure_check.min_failing={self.min_failing} must be in [1, draws={self.draws}]")

    def neighbours(self, z: Tensor, seed: int, iteration: int) -> Tensor:
        """``draws`` re-draws of one latent ``z`` ``[C, h, w]``, each on the shell ``|z'| = sqrt(d)``:
        ``[draws, C, h, w]``."""
        generator = torch.Generator().manual_seed(seed * NEIGHBOUR_SEED_STRIDE + iteration)
        noise = torch.randn((self.draws, *z.shape), generator=generator).to(z.device, z.dtype)
        near = z.unsqueeze(0) + self.sigma * noise
        norms = near.flatten(1).norm(dim=1).view(-1, *([1] * z.dim()))
        return near * (math.sqrt(z.numel()) / norms)

    def images(self) -> int:
        """Images one check generates (each charged as a forward-only draw)."""
        return self.draws


def check_neighbourhoods(search, ids: Tensor, latents: Tensor, output: EnsembleOutput) -> EnsembleOutput:
    """``output`` with ``failed`` kept only where the neighbourhood fails too (rows that did not fail are not checked).

    ``search``: a latent search with a ``failure_check``; ``ids``: ``[B]`` target ids of the batch, ``-1`` for
    padding (not checked); ``latents``: ``[B, C, h, w]``.
    Counts one check per checked target in ``search.neighbourhood_checks`` on every rank (a collective call: every
    rank calls it once per step)."""
    check: NeighbourhoodCheck = search.failure_check
    counted = torch.zeros_like(search.neighbourhood_checks)
    failed = output.failed.clone()
    for k in torch.nonzero(output.failed.cpu() & (ids.cpu() >= 0)).flatten().tolist():
        target = int(ids[k])
        t = search.targets[target]
        near = check.neighbours(latents[k].detach(), t.seed, int(search.iterations[target]))
        with torch.no_grad():
            cond = search.prompt_embeddings([t.prompt] * check.draws)
            images = search.generate(near, cond, [t.seed] * check.draws)
            verdicts = search.frozen.ensemble(images, search.class_index[[target] * check.draws].to(search.device))
        failed[k] = int(verdicts.failed.sum()) >= check.min_failing
        counted[target] += 1
    search.neighbourhood_checks += search._all_ranks_sum(counted)
    return dataclasses.replace(output, failed=failed)
