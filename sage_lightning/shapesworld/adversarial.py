"""Adversarial training of ShapesWorld's RGB members (issue 19 item 2): each training batch is attacked by
projected gradient descent in pixel space (Madry et al., 2018), L-inf ball of radius ``eps`` around the
augmented image, random start, ``steps`` sign steps of ``2.5 eps / steps``, and the member learns the true label on
the attacked images beside the clean ones. SAGE's search moves the generator's images towards where D lets go of
the class; a member that holds in a pixel ball around every training image gives that search fewer places
to stop short of changing the drawing itself."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def pgd_images(model: nn.Module, classify: Callable[[Tensor], Tensor], x01: Tensor, labels: Tensor, eps: float,
               steps: int, gen: torch.Generator) -> Tensor:
    """Images in ``[0, 1]`` ``[B, 3, H, W]`` within ``eps`` (L-inf) of ``x01`` that raise ``classify``'s
    cross-entropy on ``labels``; ``model`` (whose forward ``classify`` runs) is attacked in eval mode (batch-norm
    statistics untouched) and its train/eval mode is restored. Detached result."""
    if eps <= 0 or steps < 1:
        raise ValueError(f"PGD needs eps > 0 and steps >= 1 (got eps={eps}, steps={steps})")
    was_training = model.training
    model.eval()
    x01 = x01.detach()
    delta = (torch.rand(x01.shape, generator=gen) * 2 - 1).to(x01) * eps
    alpha = 2.5 * eps / steps
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(classify((x01 + delta).clamp(0, 1)), labels)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
    model.train(was_training)
    return (x01 + delta).clamp(0, 1).detach()
