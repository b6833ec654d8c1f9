"""Drawings of "no clean shape": the reject class of D's members (issue 19, item 2).

SAGE's real generator failures on ShapesWorld are an empty field, a blob where a shape was, several
fragments, or a smeared texture. A member that only knows the ten shapes must call each of them one of the
shapes; with a reject class it can say "nothing of the kind is drawn". These images are drawn with the
world's own backgrounds, colours and styles (``generator``), so only the object differs:

- ``empty``: the background alone (plain, gradient or texture, in each style's rendering);
- ``blob``: one smooth random closed outline (a radial Fourier series), kept only when its template IoU with
  every shape outline (the judge's ``shape_scores``, i.e. the world's own shape definitions) is below that
  shape's fit floor (``judge.fit_floor``): a blob that happens to look like a circle or a heart is not drawn;
- ``fragments``: two to five small blobs scattered over the field;
- ``smear``: a thresholded smooth noise field in the object colour (texture-like patches).

Every kind is drawn at the 64 px reference size as uint8 RGB, seeded.
"""

from __future__ import annotations

import cv2
import numpy as np

from sage_lightning.shapesworld.generator import IMAGE_SIZE, SUPERSAMPLE, Scene, render, sample_scene

REJECT_NAME = "none"
KINDS: tuple[str, ...] = ("empty", "blob", "fragments", "smear")
MAX_SHAPE_IOU = 0.62  # the judge's fit floors stay above this (judge_calibration.py)


def _radial_outline(rng: np.random.Generator, cx: float, cy: float, r: float, n: int = 96) -> np.ndarray:
    """Points of a smooth random closed curve around (cx, cy) with mean radius r."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    rad = np.ones_like(t)
    for k in range(1, 7):
        rad += rng.normal(0, 0.35 / k**0.5) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    rad = np.clip(rad, 0.2, 1.6)
    return np.stack([cx + r * rad * np.cos(t), cy + r * rad * np.sin(t)], 1)


def _fill(size: int, polys: list[np.ndarray]) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of filled polygons given at the 64 px scale."""
    hi = size * SUPERSAMPLE
    s = hi / IMAGE_SIZE
    m = np.zeros((hi, hi), np.uint8)
    cv2.fillPoly(m, [np.round(p * s * 16).astype(np.int32) for p in polys], 255, cv2.LINE_8, 4)
    return cv2.resize(m, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def _smear(rng: np.random.Generator, size: int) -> np.ndarray:
    cells = int(rng.integers(3, 8))
    field = cv2.resize(rng.standard_normal((cells, cells)).astype(np.float32), (size, size),
                       interpolation=cv2.INTER_CUBIC)
    cut = np.quantile(field, 1 - rng.uniform(0.12, 0.35))
    return np.clip((field - cut) * 4.0, 0, 1)


def reject_mask(kind: str, scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Object coverage ``[size, size]`` in [0, 1] of a reject drawing of ``kind`` placed like ``scene``."""
    from sage_lightning.shapesworld.judge import fit_floor, shape_scores

    cx, cy = scene.center
    if kind == "empty":
        return np.zeros((size, size), np.float32)
    if kind == "blob":
        for _ in range(30):
            mask = _fill(size, [_radial_outline(rng, cx, cy, scene.radius * 0.85)])
            if all(iou < fit_floor(shape) for shape, iou in shape_scores(mask > 0.5).items()):
                return mask
        return np.zeros((size, size), np.float32)  # no blob unlike every shape in 30 tries: empty
    if kind == "fragments":
        polys = [_radial_outline(rng, *rng.uniform(10, IMAGE_SIZE - 10, 2), rng.uniform(3, 8), n=48)
                 for _ in range(int(rng.integers(2, 6)))]
        return _fill(size, polys)
    if kind == "smear":
        return _smear(rng, size)
    raise ValueError(f"unknown reject kind {kind!r}: use one of {', '.join(KINDS)}")


def render_reject(kind: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """A reject drawing of ``kind`` as uint8 ``[size, size, 3]``: the world's background, colour and style."""
    scene = sample_scene(rng)
    mask = reject_mask(kind, scene, rng, size)
    return render(scene, size, mask=mask)


def make_rejects(n: int, seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """``n`` reject drawings ``[n, size, size, 3]`` uint8, the kinds in turn; seeded."""
    rng = np.random.default_rng(seed)
    if not n:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack([render_reject(KINDS[i % len(KINDS)], rng, size) for i in range(n)])


__all__ = ["REJECT_NAME", "KINDS", "reject_mask", "render_reject", "make_rejects"]
