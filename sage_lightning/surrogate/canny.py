"""Exact Canny edge maps of RGB images as ``cv2`` draws them, with the optional contrast stretch (ours; METHOD.md,
"The surrogate (discriminator D)"): what the surrogate's ``CannyEdgeMember`` and ShapesWorld's edge classifier
both see."""

from __future__ import annotations

import cv2
import numpy as np

# Contrast stretch before Canny (ours; METHOD.md, "The surrogate (discriminator D)"): these grayscale percentiles
# map to 0 and 255, unless closer than STRETCH_MIN_RANGE levels (a flat field stays flat, its noise unamplified).
STRETCH_PERCENTILES = (1.0, 99.0)
STRETCH_MIN_RANGE = 8.0


def stretch_of(gray: np.ndarray) -> tuple[float, float]:
    """``(low, scale)`` of the contrast stretch of one uint8 grayscale image: ``(gray - low) * scale``
    maps its 1st..99th percentiles onto 0..255; ``(0, 1)`` (no stretch) when they are closer than
    ``STRETCH_MIN_RANGE`` levels."""
    low, high = (float(v) for v in np.percentile(gray, STRETCH_PERCENTILES))
    if high - low < STRETCH_MIN_RANGE:
        return 0.0, 1.0
    return low, 255.0 / (high - low)


def canny_edges(images_u8: np.ndarray, low: float, high: float, l2_gradient: bool = False,
                stretch_contrast: bool = False) -> np.ndarray:
    """Exact ``cv2.Canny`` maps ``[B, H, W]`` (0 or 255) of RGB uint8 images ``[B, H, W, 3]``: grayscale by
    ``cv2.cvtColor(RGB2GRAY)``, optionally contrast-stretched (:func:`stretch_of`, rounded back to uint8)."""
    maps = []
    for img in images_u8:
        gray = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)
        if stretch_contrast:
            shift, scale = stretch_of(gray)
            gray = np.clip(np.round((gray.astype(np.float64) - shift) * scale), 0, 255).astype(np.uint8)
        maps.append(cv2.Canny(gray, low, high, L2gradient=l2_gradient))
    return np.stack(maps)
