"""Adversarial training of ShapesWorld's RGB members (issue 19 item 2): each training batch is attacked by
projected gradient descent (Madry et al., 2018), random start, ``steps`` sign steps of 2.5 x the bound / ``steps``,
and the member learns the true label on the attacked images beside the clean ones. SAGE's search moves the
generator's images towards where D lets go of the class; a member that holds around every training image gives
that search fewer places to stop short of changing the drawing itself.

Two threat models: an L-inf ball of radius ``eps`` in pixel space, and optionally before it a worst-case
*recolouring* (``ColourBox``): ``x -> (I + E) x + b`` per image, the colour matrix within ``gain`` of 1 on its
diagonal and ``mix`` off it, the offset within ``offset``. SAGE's D-only failures are mostly the same shape
darker, paler or in other colours, far outside a pixel ball but a few numbers of a colour map away."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ColourBox:
    """Bounds of the recolouring adversary ``x -> (I + E) x + b``: ``|E_ii| <= gain``, ``|E_ij| <= mix``,
    ``|b_i| <= offset``. The defaults keep every colour matrix's smallest eigenvalue at 0.5 or more
    (``1 - gain - 2 mix``), so a shape's contrast with its background is never more than halved."""

    gain: float = 0.3
    mix: float = 0.1
    offset: float = 0.15

    def __post_init__(self) -> None:
        if min(self.gain, self.mix, self.offset) < 0 or self.gain + 2 * self.mix >= 1:
            raise ValueError(f"ColourBox needs non-negative bounds with gain + 2 mix < 1 (got {self}): a colour "
                             "matrix could then erase the shape, and its label would be wrong")

    def matrix_bound(self) -> Tensor:
        """``[3, 3]``: ``gain`` on the diagonal, ``mix`` off it."""
        return torch.full((3, 3), self.mix) + torch.eye(3) * (self.gain - self.mix)


def recolour(x01: Tensor, colour: Tensor, offset: Tensor) -> Tensor:
    """``(I + colour) x + offset`` per image: ``x01`` ``[B, 3, H, W]``, ``colour`` ``[B, 3, 3]``, ``offset``
    ``[B, 3]``."""
    return x01 + torch.einsum("bij,bjhw->bihw", colour, x01) + offset[:, :, None, None]


def pgd_images(model: nn.Module, classify: Callable[[Tensor], Tensor], x01: Tensor, labels: Tensor, eps: float,
               steps: int, gen: torch.Generator, colour: ColourBox | None = None) -> Tensor:
    """Images in ``[0, 1]`` ``[B, 3, H, W]`` within ``eps`` (L-inf) of ``x01`` -- of its worst recolouring within
    ``colour`` where given -- that raise ``classify``'s cross-entropy on ``labels``; ``model`` (whose forward
    ``classify`` runs) is attacked in eval mode (batch-norm statistics untouched) and its train/eval mode is
    restored. Detached result."""
    if eps <= 0 or steps < 1:
        raise ValueError(f"PGD needs eps > 0 and steps >= 1 (got eps={eps}, steps={steps})")
    was_training = model.training
    model.eval()
    x01 = x01.detach()
    b = x01.shape[0]
    bounds = [torch.full(x01.shape, eps)]  # the pixel ball, then (where given) the colour matrix and offset
    if colour is not None:
        bounds += [colour.matrix_bound().expand(b, 3, 3), torch.full((b, 3), colour.offset)]
    bounds = [bound.to(x01) for bound in bounds]
    params = [(torch.rand(bound.shape, generator=gen).to(x01) * 2 - 1) * bound for bound in bounds]

    def attacked(delta: Tensor, *colour_params: Tensor) -> Tensor:
        base = recolour(x01, *colour_params).clamp(0, 1) if colour_params else x01
        return (base + delta).clamp(0, 1)

    for _ in range(steps):
        params = [p.detach().requires_grad_(True) for p in params]
        loss = F.cross_entropy(classify(attacked(*params)), labels)
        grads = torch.autograd.grad(loss, params)
        params = [torch.maximum(torch.minimum(p.detach() + 2.5 * bound / steps * g.sign(), bound), -bound)
                  for p, g, bound in zip(params, grads, bounds, strict=True)]
    model.train(was_training)
    return attacked(*params).detach()
