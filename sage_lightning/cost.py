"""The compute a search spends: one cost model for every search, its writer, its baseline and the progress bar.

Two units, both counted per image (a batch of B images costs B times as much):

* **forward-equivalents** (METHOD.md, "The cost unit"; what budgets are matched in): a UNet forward = 1, a backward
  through the UNet = :data:`BACKWARD_FORWARDS` = 2, a checkpointed step's recomputed forward = 1 more.
* **UNet evaluations** (the records' ``unet_evaluations``): UNet calls, a backward counted as one call and a
  checkpointed recompute as one more.

One image runs ``loop_length`` denoising steps (the scheduler's own count), each a UNet call per guidance branch
(two with classifier-free guidance: conditional and unconditional counted apart). A gradient step adds a
backward through every step the gradient mode keeps a graph for (``graphed_steps``), in each branch. Forwards
cost the same in both units; only backwards differ. Nothing here needs model weights: a baseline sizes its
budget before anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

Unit = Literal["forward_equivalents", "unet_evaluations"]
FORWARD_EQUIVALENTS: Unit = "forward_equivalents"
UNET_EVALUATIONS: Unit = "unet_evaluations"
BACKWARD_FORWARDS = 2  # a backward through the UNet costs about two forwards (METHOD.md, "The cost unit")
BACKWARD_COST = {FORWARD_EQUIVALENTS: BACKWARD_FORWARDS, UNET_EVALUATIONS: 1}  # one graphed step's backward
RECOMPUTE_COST = 1  # a checkpointed step runs its forward again in backward (both units)


class GradientModeLike(Protocol):
    """What the cost model reads of a gradient mode (:class:`sage_lightning.sampler.GradientMode`)."""

    checkpoint: bool

    def graphed_steps(self, num_steps: int) -> int: ...


def guidance_branches(guidance_scale: float) -> int:
    """UNet calls per denoising step: 2 with classifier-free guidance (on above 1, as diffusers), else 1."""
    return 2 if guidance_scale > 1.0 else 1


@dataclass(frozen=True)
class SamplingCost:
    """The cost of sampling (and differentiating through) one image with fixed sampling settings.

    ``loop_length``: denoising steps per image; ``branches``: UNet calls per step (:func:`guidance_branches`);
    ``graphed_steps``: steps a backward runs through; ``checkpoint``: those steps recompute their forward.
    """

    loop_length: int
    branches: int
    graphed_steps: int
    checkpoint: bool

    @classmethod
    def of(cls, loop_length: int, guidance_scale: float, grad_mode: GradientModeLike) -> SamplingCost:
        """The cost of ``loop_length`` steps at ``guidance_scale`` with ``grad_mode``'s graph."""
        return cls(loop_length, guidance_branches(guidance_scale), grad_mode.graphed_steps(loop_length),
                   bool(grad_mode.checkpoint))

    def image(self) -> int:
        """One generated image: ``loop_length`` UNet forwards per branch (the same in both units)."""
        return self.loop_length * self.branches

    def backward(self, unit: Unit = FORWARD_EQUIVALENTS) -> int:
        """One backward from the image to the search variables: every graphed step of every branch."""
        return self.graphed_steps * self.branches * (BACKWARD_COST[unit] + (RECOMPUTE_COST if self.checkpoint else 0))

    def step(self, unit: Unit = FORWARD_EQUIVALENTS) -> int:
        """One gradient step: an image and the backward through it."""
        return self.image() + self.backward(unit)

    def gradient_search(self, iterations: int, unit: Unit = FORWARD_EQUIVALENTS) -> int:
        """A target after ``iterations`` updates: ``iterations + 1`` evaluations (the last one decides and is not
        differentiated) and ``iterations`` backwards."""
        return (iterations + 1) * self.image() + iterations * self.backward(unit)

    def draws(self, iterations: int) -> int:
        """A target of a forward-only baseline after ``iterations`` extra draws (its first image included)."""
        return (iterations + 1) * self.image()

    def draws_within(self, budget: int) -> int:
        """The most extra draws whose cost (:meth:`draws`) fits in ``budget``."""
        return max(budget // self.image() - 1, 0)
