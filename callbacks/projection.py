"""Keep adversarial latents non-outliers of N(0, I): move z = z0 + delta onto the Gaussian shell |z| = sqrt(d),
inside the run's box for delta (METHOD.md, "Latent-space search": delta clamped, z a non-outlier)."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor

from sage_lightning.constraints import run_box, sphere_in_box


def shell_in_box(z0: Tensor, delta: Tensor, low: float, high: float) -> Tensor:
    """The delta (rows ``[B, ...]``) whose ``z = z0 + delta`` lies on |z| = sqrt(d) with delta in ``[low, high]``
    (:func:`~sage_lightning.constraints.sphere_in_box` at radius sqrt(d))."""
    return sphere_in_box(z0, delta, low, high, math.sqrt(delta[0].numel()))


def _mean_into(flat: Tensor, bound: float | Tensor) -> Tensor:
    """``flat`` ``[..., n]`` moved by a constant along its last axis so that its mean lies in ``[-bound, bound]``."""
    mean = flat.mean(-1, keepdim=True)
    return flat - (mean - mean.clamp(-bound, bound))


def bound_channel_means(z: Tensor, sigmas: float) -> Tensor:
    """``z`` ``[B, C, ...]`` with each channel's mean moved (by a constant over the channel) into
    ``+/- sigmas / sqrt(n)``, ``n`` entries per channel: the spread of a channel mean of N(0, I)."""
    flat = z.flatten(2)
    return _mean_into(flat, sigmas / math.sqrt(flat.shape[-1])).view_as(z)


def bound_mean(z: Tensor, z0: Tensor, sigmas: float) -> Tensor:
    """``z`` ``[B, ...]`` with its mean over all ``d`` entries moved (by a constant) into ``+/- sigmas / sqrt(d)``, the
    spread of that mean under N(0, I), or into ``+/- |mean(z0)|`` where z0's own mean lies farther out (so z0 stays)."""
    flat = z.flatten(1)
    bound = z0.flatten(1).mean(1, keepdim=True).abs().clamp(min=sigmas / math.sqrt(flat.shape[1]))
    return _mean_into(flat, bound).view_as(z)


class LatentProjection(L.Callback):
    """After each step, for stepped targets: z onto the shell |z| = sqrt(d), delta kept in the run's box.

    A sample of N(0, I) in d dimensions has ``|z| ~ sqrt(d)``; SAGE's latents must not be outliers. When the
    run also has a :class:`~sage_lightning.callbacks.ClampPerturbation`, the projection moves along the box
    (:func:`shell_in_box`) instead of scaling z freely, so the step's result satisfies both constraints
    whatever the order of the two callbacks (the clamp then finds delta already inside its box).

    Args:
        channel_mean_sigmas: (ours, off by default) also keep each latent channel's mean within this many
            standard deviations of a N(0, I) channel mean (``bound_channel_means``), alternated twice with the
            shell projection (the result is on the shell exactly, the channel means within the bound up to
            the shell's small rescaling). A sign-step search drifts whole channels (a global colour or
            brightness shift of the image): a channel mean of 5 sigma is an outlier of N(0, I) that the norm
            does not see, and the entries' KS test does.
        channel_shift_sigmas: (ours, off by default) keep each channel's mean of *delta* within this many standard
            deviations of a N(0, I) channel mean (0: z keeps z0's channel means), alternated with the shell as
            above. A constant offset of a latent channel is a global colour or brightness shift of the image (the
            same shape recoloured or washed out, which fools D without being a failure of the generator); with 0
            the search can only move what is drawn where.
        mean_sigmas: (ours, off by default) keep the latent's mean over all its entries within this many standard
            deviations of that mean under N(0, I) (``1 / sqrt(d)``), or within z0's own if that lies farther
            (``bound_mean``), alternated with the shell as above. One direction of d: the search keeps its channel
            contrasts; what it loses is a drift of every channel the same way, which the entries' KS test sees
            (several channels at +3 sigma) and the norm does not.
    """

    def __init__(self, channel_mean_sigmas: float | None = None, channel_shift_sigmas: float | None = None,
                 mean_sigmas: float | None = None) -> None:
        if channel_mean_sigmas is not None and not channel_mean_sigmas > 0:
            raise ValueError(f"channel_mean_sigmas={channel_mean_sigmas} must be > 0 (e.g. 3.0), or null for none")
        if channel_shift_sigmas is not None and not channel_shift_sigmas >= 0:
            raise ValueError(f"channel_shift_sigmas={channel_shift_sigmas} must be >= 0 (0: z keeps z0's channel "
                             "means), or null for none")
        if mean_sigmas is not None and not mean_sigmas > 0:
            raise ValueError(f"mean_sigmas={mean_sigmas} must be > 0 (e.g. 1.0), or null for none")
        self.channel_mean_sigmas = channel_mean_sigmas
        self.channel_shift_sigmas = channel_shift_sigmas
        self.mean_sigmas = mean_sigmas

    def _onto_shell(self, z0: Tensor, delta: Tensor, box: tuple[float, float] | None) -> Tensor:
        if box is None:
            z = z0 + delta
            norms = z.flatten(1).norm(dim=1).view(-1, *([1] * (z.dim() - 1)))
            return z * (math.sqrt(z[0].numel()) / norms) - z0
        return shell_in_box(z0, delta, *box)

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rows = pl_module.stepped_targets.to(pl_module.device)
        if not rows.numel():
            return
        delta = pl_module.adversarial_rows()
        z0 = pl_module.initial_latents(rows)
        box = run_box(trainer)
        step = delta[rows]
        bounded = self.channel_mean_sigmas or self.channel_shift_sigmas is not None or self.mean_sigmas
        for _ in range(2 if bounded else 1):
            if self.channel_mean_sigmas:
                step = bound_channel_means(z0 + step, self.channel_mean_sigmas) - z0
            if self.mean_sigmas:
                step = bound_mean(z0 + step, z0, self.mean_sigmas) - z0
            if self.channel_shift_sigmas is not None:
                step = bound_channel_means(step, self.channel_shift_sigmas)
            step = self._onto_shell(z0, step, box)
        delta[rows] = step
