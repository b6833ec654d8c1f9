"""The sign-gradient optimizer of SAGE's PGD steps: ``p <- p - lr * sign(grad)``."""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

from sage_lightning.errors import SageError

MAX_LR = 10.0  # a sign step moves every entry by lr: latents are N(0, 1), the clamp boxes are [-1, 1] / [-2.5, 2.5]


def check_lr(lr: float, who: str = "lr") -> None:
    """Refuse a step size that is not a positive number of reasonable magnitude (SageError)."""
    if not (math.isfinite(lr) and 0 < lr <= MAX_LR):
        raise SageError(f"{who}={lr} must be > 0 and at most {MAX_LR:g} (a sign step moves every entry by lr)")


class SignSGD(Optimizer):
    """Projected-gradient-descent step (METHOD.md): each element moves by exactly ``lr`` against
    the sign of its gradient; elements with zero gradient (targets not in the batch) do not move.
    Clamping and projection are separate callbacks.

    ``scale`` (optional, ``[D]``, broadcast over a parameter's last dimension): each entry moves by
    ``lr * scale`` instead, e.g. a fraction ``lr`` of its token table's entry std (:mod:`sage_lightning.embedding`)."""

    def __init__(self, params, lr: float = 0.05, scale: torch.Tensor | None = None) -> None:
        check_lr(lr, "SignSGD lr")
        if scale is not None and not (bool(torch.isfinite(scale).all()) and bool((scale > 0).all())):
            raise SageError("SignSGD scale must be finite and > 0 in every entry")
        super().__init__(params, {"lr": lr, "steps": 0, "scale": scale})  # steps: in the checkpoint

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            group["steps"] = group.get("steps", 0) + 1
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not bool(torch.isfinite(p.grad).all()):  # sign(nan) = nan would poison the parameter
                    bad = p.grad[~torch.isfinite(p.grad)].flatten()[0].item()
                    raise SageError(
                        f"the gradient holds {bad} at optimizer step {group['steps']}: the search diverged (lower lr "
                        "or guidance_scale); nothing of this step was written"
                    )
                step = p.grad.sign()
                if group.get("scale") is not None:
                    step = step * group["scale"].to(p.device, p.dtype)
                p.add_(step, alpha=-group["lr"])
        return loss
