"""The local random baseline of latent SAGE: random perturbations of z0 in SAGE's own box, same budget.

SAGE's latent claim is local (METHOD.md, "Latent-space search"): from a seed z0 whose image the model
gets right, a small, non-outlier perturbation delta makes it fail, and sign-gradient steps through the
sampler find one more often than chance. This search is the chance: for each target (class c, prompt p,
seed z0), the first evaluation is z0 itself (as SAGE's), then every iteration draws a fresh delta

* ``mode="uniform"``: uniform in the clamp box ``[low, high]^d``;
* ``mode="corners"``: a random sign vector at the box's corners (``low`` or ``high`` per entry, each with
  probability 1/2), where sign-gradient steps of size ``lr`` pile up after ``(high - low) / lr`` steps;
* ``mode="sign_walk"``: SAGE's own steps without the gradient: ``delta += lr * s`` with a fresh random sign
  vector s each iteration (SAGE's ``lr``), then the same clamp and projection. Uniform draws land about
  0.5 sqrt(d) from z0 and corners farther, while SAGE's failures lie 0.2-0.3 sqrt(d) away: the walk stays at
  SAGE's distances, so it is the null for "the gradient's direction matters" (issue 19 item 5);

and the run's own constraint callbacks (``ClampPerturbation``, ``LatentProjection`` onto the Gaussian shell
|z| = sqrt(d)) act on it exactly as they act on a SAGE step. The image of ``z = z0 + delta`` under p is
judged by D; the target is *found* at the first draw that fails D, *exhausted* after ``max_iterations``
draws. ``match_sage_iterations`` sizes the draws to SAGE's forward-equivalent budget per target
(:meth:`SamplingCost.draws_within`), shared with the fresh-seed baseline.

Each draw is a function of (target, draw index) only, from its own generator seeded by the target's class,
prompt and seed (two targets never share a stream, not even two classes on the same seed): every rank
computes the draws of every stepped target, so ``delta`` stays replicated under DDP, a resumed run draws what
an uninterrupted one would, and a DDP run equals a one-device run. A scheduler that draws noise (euler-a,
DDIM with eta > 0) draws it, at every draw, from the target's own generator exactly as SAGE does
(:meth:`noise_seed`): z0 + delta is the only thing that differs from SAGE's evaluation at the same iteration.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch
from torch import Tensor

from sage_lightning.constraints import run_box  # the box LatentProjection keeps delta in, too
from sage_lightning.errors import SageError
from sage_lightning.searches.latent import LatentSearch
from sage_lightning.searches.random_latent import RandomLatentSearch

MODES = ("uniform", "corners", "sign_walk")


class RandomPerturbationSearch(RandomLatentSearch):
    """Random delta in SAGE's box around each target's z0. Parameter: ``delta`` ``[N_targets, C, h, w]``
    (written by the draws, never by an optimizer; a parameter so that it is checkpointed and DDP runs).

    Args:
        mode: ``"uniform"`` (uniform in the box), ``"corners"`` (random sign vectors at the box's corners) or
            ``"sign_walk"`` (random sign steps of SAGE's ``lr`` from the previous delta).
        match_sage_iterations: ``max_iterations`` = the draws that fit in the forward-equivalents of that
            many SAGE iterations with this config's ``grad_mode`` (see :class:`RandomLatentSearch`).
        **kwargs: :class:`LatentSearch` (diffusion, ensemble, num_steps, guidance_scale, grad_mode, ...).

    The box is the run's ``sage_lightning.callbacks.ClampPerturbation`` range (their intersection if several, as
    ``LatentProjection`` takes it; SAGE's own [-1, 1] when the config lists none, :meth:`constraints`), so the
    baseline cannot drift from the SAGE config it is compared with.
    Example (the same as ``sage fit --config configs/latent_search.yaml --config configs/random_perturbation.yaml``)::

        search = RandomPerturbationSearch(diffusion="shapesworld", mode="corners", match_sage_iterations=20)
        trainer = L.Trainer(callbacks=[ClampPerturbation(-1, 1), LatentProjection()], ...)
        trainer.fit(search, datamodule=ClassPromptDataModule(classes="all", seeds_per_class=2))
    """

    def __init__(self, *args, mode: Literal["uniform", "corners", "sign_walk"] = "uniform", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if mode not in MODES:
            raise SageError(f"mode={mode!r} is unknown: use 'uniform', 'corners' or 'sign_walk'")
        self.mode = mode
        self.box: tuple[float, float] | None = None

    def init_parameters(self) -> None:
        LatentSearch.init_parameters(self)  # delta = 0: the first evaluation is z0 itself, as SAGE's

    def constraints(self) -> list[tuple[str, dict]]:
        """SAGE's own (the latent search's box and shell): a draw is constrained exactly as a SAGE step."""
        return LatentSearch.constraints(self)

    def setup(self, stage: str) -> None:
        LatentSearch.setup(self, stage)  # DDP is fine here (module docstring), unlike fresh seeds
        self.box = run_box(self.trainer)
        if self.box is None:
            raise SageError(
                "RandomPerturbationSearch draws delta in the box of the run's ClampPerturbation: add it to "
                "trainer.callbacks (sage fit --config configs/latent_search.yaml --config "
                "configs/random_perturbation.yaml keeps latent_search's)"
            )

    # ------------------------------------------------------------------------------------ draws
    def draw_seed(self, target: int, draw: int) -> int:
        """The generator seed of ``target``'s draw number ``draw``: a function of the target (class, prompt, seed)
        and ``draw`` only, apart from every other target's and from the scheduler-noise seeds."""
        t = self.targets[target]
        key = f"sage-lightning perturbation\0{t.class_name}\0{t.prompt}\0{t.seed}\0{draw}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") % 2**63

    def noise_seed(self, target: int, iteration: int) -> int:
        """Every draw's scheduler noise is SAGE's for this target (its own seed's generator,
        :func:`~sage_lightning.targets.noise_generator`), not a fresh seed's as for :class:`RandomLatentSearch`:
        with a noisy scheduler only delta would otherwise be held to SAGE's setting."""
        return self.targets[target].seed

    def perturbation(self, target: int, draw: int) -> Tensor:
        """Draw number ``draw`` (>= 1) of ``target``: delta ``[C, h, w]``, before the constraints (in the box for
        uniform and corners; the sign walk's step from the target's current delta)."""
        if self.box is None:
            raise RuntimeError("the box is unknown before setup: run trainer.fit with a ClampPerturbation")
        low, high = self.box
        u = torch.rand(self.latent_shape(), generator=torch.Generator().manual_seed(self.draw_seed(target, draw)))
        if self.mode == "uniform":
            return low + (high - low) * u
        if self.mode == "sign_walk":
            step = torch.where(u < 0.5, -self.lr, self.lr)
            return self.delta[target].detach().cpu().float() + step
        return torch.where(u < 0.5, torch.full_like(u, low), torch.full_like(u, high))

    def draw(self, target: int, iteration: int) -> Tensor:
        """The latent evaluated at ``iteration``: ``z0 + delta`` (delta = 0 at iteration 0), ``[C, h, w]``."""
        return self.initial_latents(torch.tensor([target]))[0] + self.delta[target]

    @torch.no_grad()
    def training_step(self, ids: Tensor, batch_idx: int) -> None:
        super().training_step(ids, batch_idx)  # judge z0 + delta, advance the targets (all ranks agree)
        for target in self.stepped_targets.tolist():  # every rank draws every stepped target: replicated
            draw = int(self.iterations[target])
            self.delta[target] = self.perturbation(target, draw).to(self.delta)
        # the constraint callbacks (clamp, projection) now act on the stepped rows, as after a SAGE step
