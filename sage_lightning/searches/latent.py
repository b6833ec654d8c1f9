"""Latent-space SAGE (METHOD.md, "Latent-space search").

For each target (class c, prompt p, seed s): z0 = N(0, I) from s; find delta so that the image of
z = z0 + delta under prompt p fails the discriminator D, by sign-gradient steps on
``loss = mean_m (2 p_m(c) - 1)`` (p_m(c) over the classes only where D says so: ``ClassifierEnsemble(loss_over=...)``);
after each step delta is clamped to its box and z projected onto the Gaussian
shell, by the search's own constraints (:meth:`LatentSearch.constraints`:
``sage_lightning.callbacks.ClampPerturbation(-1, 1)``, ``sage_lightning.callbacks.LatentProjection``; a config
changes them by listing its own).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sage_lightning.searches.base import LATENT_BOX, TargetSearch, clamp_constraint
from sage_lightning.targets import seeded_latent


class LatentSearch(TargetSearch):
    """Trainable parameters: ``delta`` ``[N_targets, C, h, w]``, the adversarial latent perturbations.

    Example (the same as ``sage fit --config configs/latent_search.yaml``)::

        search = LatentSearch(diffusion="shapesworld", max_iterations=20)
        trainer.fit(search, datamodule=ClassPromptDataModule(classes=["star"], seeds_per_class=4))
    """

    def constraints(self) -> list[tuple[str, dict]]:
        """delta in the box [-1, 1], z on the Gaussian shell |z| = sqrt(d) (METHOD.md, "Latent-space search")."""
        return [clamp_constraint(LATENT_BOX), ("sage_lightning.callbacks.projection.LatentProjection", {})]

    def init_parameters(self) -> None:
        self.delta = nn.Parameter(torch.zeros(len(self.targets), *self.latent_shape()))

    def adversarial_rows(self) -> nn.Parameter:
        """The parameter whose rows (one per target) the clamp callback acts on."""
        return self.delta

    def initial_latents(self, ids: Tensor) -> Tensor:
        """z0 of each target, ``[B, C, h, w]``: a function of the target's seed only."""
        shape = self.latent_shape()
        return torch.stack([seeded_latent(self.targets[int(i)].seed, shape) for i in ids]).to(self.device)

    def training_step(self, ids: Tensor, batch_idx: int) -> Tensor:
        rows = ids.clamp(min=0)
        z = self.initial_latents(rows) + self.delta[rows]
        cond = self.prompt_embeddings([self.targets[int(i)].prompt for i in rows])
        images = self.generate(z, cond, [self.targets[int(i)].seed for i in rows])
        output = self.frozen.ensemble(images, self.class_index[rows.cpu()].to(self.device))
        active = self.advance(ids, images, z, output)
        self.log("loss", output.loss, prog_bar=True, batch_size=len(ids))
        return self.step_loss(output.per_sample_loss, active)
