"""Nuisance views of an image for D (ours; METHOD.md, "The surrogate (discriminator D)"): the same picture
recoloured, grey, blurred, at half resolution or contrast-stretched. A person names the shape in every view; an
adversarial perturbation against D's members rarely survives them all, while a real failure of the generator (an
empty field, a blob, the wrong shape) does. D averages each member's probabilities over the views (expectation over
transformations), so the search can only make D fail by changing what every view shows.

Every view is differentiable and deterministic (no random draw), so a search stays reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sage_lightning.errors import SageError, closest_names

_GRAY = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
_BLUR = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0  # binomial 5-tap, sigma ~ 1 px


def _gray(x: Tensor) -> Tensor:
    return (x * _GRAY.to(x)).sum(1, keepdim=True).expand_as(x)


def _blur(x: Tensor) -> Tensor:
    c = x.shape[1]
    k = _BLUR.to(x)
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), k.view(1, 1, 1, 5).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), k.view(1, 1, 5, 1).repeat(c, 1, 1, 1), groups=c)


def _half(x: Tensor) -> Tensor:
    small = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)


STRETCH_FLOOR = 0.1  # least luminance range the stretch divides by: a flat field's noise is not blown up


def _stretch(x: Tensor) -> Tensor:
    """The image's luminance 1st-99th percentiles stretched to 0-1 (one gain and offset for all channels, so hues
    keep): a washed-out shape a person still sees is shown at full contrast."""
    low, high = torch.quantile(_gray(x)[:, 0].flatten(1), torch.tensor([0.01, 0.99]).to(x), dim=1)
    return (x - low.view(-1, 1, 1, 1)) / (high - low).clamp_min(STRETCH_FLOOR).view(-1, 1, 1, 1)


VIEWS: dict[str, Callable[[Tensor], Tensor]] = {
    "image": lambda x: x,
    "gbr": lambda x: x[:, [1, 2, 0]],  # hue rotated by a third
    "brg": lambda x: x[:, [2, 0, 1]],  # and by two thirds
    "gray": _gray,
    "blur": _blur,
    "half": _half,
    "stretch": _stretch,
}


def check_views(names: Sequence[str]) -> list[str]:
    """The view names, validated (SageError naming the unknown one and the known ones)."""
    names = list(names)
    if not names:
        raise SageError(f"views is empty; give at least one of {sorted(VIEWS)} (\"image\": D on the image only)")
    for name in names:
        if name not in VIEWS:
            close = closest_names(name, list(VIEWS))
            raise SageError(f"unknown view {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                            + f"; known: {sorted(VIEWS)}")
    return names


def stack_views(images: Tensor, names: Sequence[str]) -> Tensor:
    """Images ``[B, 3, H, W]`` -> their views ``[V * B, 3, H, W]`` (view-major), in [0, 1]."""
    return torch.cat([VIEWS[name](images).clamp(0, 1) for name in names])
