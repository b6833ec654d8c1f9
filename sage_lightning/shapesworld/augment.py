"""Training augmentation of ShapesWorld's classifiers (``classifiers.ClassifierModule``): shape classes are
invariant to geometry, colour, contrast and texture, so the classifiers see them all changed. Every draw comes
from the caller's ``torch.Generator``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _smooth_field(b: int, size: int, gen: torch.Generator, channels: int = 3) -> Tensor:
    cells = int(torch.randint(2, 9, (1,), generator=gen))
    coarse = torch.randn(b, channels, cells, cells, generator=gen)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)


def _blur(x: Tensor, sigma: float) -> Tensor:
    r = max(1, math.ceil(2.5 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def geometric_augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Dihedral flips/rotations, small rotation, scale and shift (shape classes are invariant to them)."""
    b = x.shape[0]
    k = torch.randint(0, 4, (1,), generator=gen).item()
    x = torch.rot90(x, k, dims=(2, 3))
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
    ang = (torch.rand(b, generator=gen) - 0.5) * math.radians(40)
    # object size factor: half the time 0.8-1.05 (the generator's own), else 0.5-1.15 (small and large shapes)
    wide = torch.rand(b, generator=gen) < 0.5
    size = torch.where(wide, 0.5 + 0.65 * torch.rand(b, generator=gen), 0.8 + 0.25 * torch.rand(b, generator=gen))
    scale = 1.0 / size
    shift = (torch.rand(b, 2, generator=gen) - 0.5) * 0.12
    cos, sin = torch.cos(ang) * scale, torch.sin(ang) * scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def contrast_augment(x: Tensor, gen: torch.Generator, p: float = 0.35, least: float = 0.1) -> Tensor:
    """Contrast lowered towards each image's border colour (its background) by a factor log-uniform in
    [``least``, 1], with probability ``p`` per image: a washed-out shape is still that shape."""
    b = x.shape[0]
    border = torch.cat([x[..., :2, :].flatten(2), x[..., -2:, :].flatten(2), x[..., :, :2].flatten(2),
                        x[..., :, -2:].flatten(2)], 2)
    background = border.median(2).values.view(b, 3, 1, 1)
    k = torch.exp(math.log(least) * torch.rand(b, 1, 1, 1, generator=gen))
    k = torch.where(torch.rand(b, 1, 1, 1, generator=gen) < p, k, torch.ones_like(k))
    return (background + k * (x - background)).clamp(0, 1)


def style_augment(x: Tensor, gen: torch.Generator, strength: float = 1.0) -> Tensor:
    """Heavy, per-sample colour / background / texture changes of images in [0, 1]."""
    b = x.shape[0]

    def coin(p: float) -> Tensor:
        return (torch.rand(b, 1, 1, 1, generator=gen) < p * strength).to(x.dtype)

    perms = torch.stack([torch.randperm(3, generator=gen) for _ in range(b)])
    permuted = torch.gather(x, 1, perms.view(b, 3, 1, 1).expand_as(x))
    x = x + coin(0.7) * (permuted - x)
    gain = 0.6 + 0.8 * torch.rand(b, 3, 1, 1, generator=gen)
    offset = (torch.rand(b, 3, 1, 1, generator=gen) - 0.5) * 0.4
    x = x + coin(0.7) * ((x - 0.5) * gain + 0.5 + offset - x)
    mix = torch.softmax(torch.randn(b, 3, 3, generator=gen) * 2, dim=-1)  # random colour mixing ("hue")
    x = x + coin(0.3) * (torch.einsum("bij,bjhw->bihw", mix, x) * 1.3 - x)
    x = x + coin(0.25) * (1 - 2 * x)  # inversion
    gray = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True).expand_as(x)
    x = x + coin(0.2) * (gray - x)
    x = x + coin(0.5) * 0.2 * torch.rand(b, 1, 1, 1, generator=gen) * _smooth_field(b, x.shape[-1], gen)
    x = x + coin(0.5) * 0.08 * torch.rand(b, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    x = x.clamp(0, 1)
    if torch.rand(1, generator=gen).item() < 0.35 * strength:
        x = _blur(x, 0.4 + 1.2 * torch.rand(1, generator=gen).item())
    return x
