"""The baseline any user tries first: fresh random latents, same budget in the same units as SAGE.

For each target, draw latents z ~ N(0, I) (the first is the target's own z0, the same one SAGE starts
from), generate, and stop at the first one that D declares a failure. ``match_sage_iterations``
converts a latent-search budget (iterations of forward + backward) into forward-only draws, so both
spend the same compute in forward-equivalents (:mod:`sage_lightning.cost`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from sage_lightning.errors import SageError
from sage_lightning.searches.latent import LatentSearch
from sage_lightning.targets import seeded_latent

DRAW_SEED_STRIDE = 1_000_003


class RandomLatentSearch(LatentSearch):
    """Random sampling of latents. No trainable parameters; ``max_iterations`` = extra draws.

    Args:
        match_sage_iterations: if given, ``max_iterations`` is set so that the draws cost at most as many
            forward-equivalents as that many latent-search iterations with ``grad_mode`` would.
            ``"max_iterations"``: the SAGE budget of this same config, i.e. its ``max_iterations`` (or the
            model's default when it names none: 20 on ShapesWorld, the paper's 100 on Stable Diffusion), so a
            baseline given after a SAGE config (``configs/random_latent.yaml``) spends what that SAGE run spends.
    """

    def __init__(
        self, *args, match_sage_iterations: int | Literal["max_iterations"] | None = None, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        if match_sage_iterations == "max_iterations":
            match_sage_iterations = self.max_iterations  # the SAGE config's own budget, its model's default included
        self.match_sage_iterations = match_sage_iterations
        if match_sage_iterations is not None:  # here, not at set-up: the CLI sizes max_epochs from it
            if match_sage_iterations < 0:
                raise SageError(f"match_sage_iterations={match_sage_iterations} must be >= 0")
            self.max_iterations = self.cost.draws_within(self.cost.gradient_search(match_sage_iterations))

    def init_parameters(self) -> None:
        """Nothing to optimise: every draw is a fresh latent."""

    def constraints(self) -> list[tuple[str, dict]]:
        """None: a fresh latent is a draw of N(0, I) itself, with no delta to clamp or project."""
        return []

    def forward_equivalents(self, iterations: int) -> int:
        """Forwards only: ``iterations + 1`` draws (:meth:`SamplingCost.draws`)."""
        return self.cost.draws(iterations)

    def unet_evaluations(self, iterations: int) -> int:
        """Forwards only, so the same count as :meth:`forward_equivalents`."""
        return self.cost.draws(iterations)

    def setup(self, stage: str) -> None:
        if self.trainer.world_size > 1:
            raise SageError("RandomLatentSearch runs on one device: drop --trainer.devices/strategy for the baseline")
        super().setup(stage)

    def configure_optimizers(self):
        return None

    def noise_seed(self, target: int, iteration: int) -> int:
        """Seed of a target's draw at ``iteration``: its latent and its scheduler noise; draw 0 is its own z0."""
        seed = self.targets[target].seed
        return seed if iteration == 0 else seed + DRAW_SEED_STRIDE * iteration

    def draw(self, target: int, iteration: int) -> Tensor:
        return seeded_latent(self.noise_seed(target, iteration), self.latent_shape())

    @torch.no_grad()
    def training_step(self, ids: Tensor, batch_idx: int) -> None:
        rows = ids.clamp(min=0)
        z = torch.stack([self.draw(int(i), int(self.iterations[i])) for i in rows]).to(self.device)
        cond = self.prompt_embeddings([self.targets[int(i)].prompt for i in rows])
        images = self.generate(z, cond, [self.noise_seed(int(i), int(self.iterations[i])) for i in rows])
        output = self.frozen.ensemble(images, self.class_index[rows.cpu()].to(self.device))
        self.advance(ids, images, z, output)
