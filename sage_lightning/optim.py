"""The sign-gradient optimizer of SAGE's PGD steps: ``p <- p - lr * sign(grad)``."""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from sage_lightning.errors import SageError


class SignSGD(Optimizer):
    """Projected-gradient-descent step (SAGE_METHOD.md): each element moves by exactly ``lr`` against
    the sign of its gradient; elements with zero gradient (targets not in the batch) do not move.
    Clamping and projection are separate callbacks."""

    def __init__(self, params, lr: float = 0.05) -> None:
        if not lr > 0:
            raise SageError(f"SignSGD lr={lr} must be > 0")
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])
        return loss
