"""ShapesWorld's geometric judge: names the shape and colour of the object in an image, with no learning.

It is the independent check of found failures (the paper's human study plays this role) and is never a
member of the surrogate ensemble. Only OpenCV/NumPy geometry:

1. **Background model.** A plane ``a + b x + c y`` per channel fitted (least squares, with one round of
   outlier rejection) to a border band of the image: exact for plain and gradient backgrounds, the
   mean for textured ones.
2. **Object colour.** Pixels far from the background (Otsu threshold on the distance), eroded so that
   outlines and anti-aliased edges drop out; their median is the object colour.
3. **Coverage.** Each pixel's colour is projected on the line background -> object colour, which
   estimates its alpha (the compositing coverage); ``alpha > 0.5`` is the object. This ignores drop
   shadows and texture that move across that line, and it is blur-invariant for straight edges.
   Opening, then the largest component, which must hold at least half of the object-coloured pixels
   (else: no single object, e.g. noise); the border must fit the background model and little outside
   the object may look like object (else: clutter, no clean scene; fresh images stay below a third of
   these limits). Holes larger than a speck are kept (a ring has one).
4. **Contour features** of the component: circularity, polygon vertices (``approxPolyDP``), solidity,
   convexity defects, holes, mirror symmetry, extent; reported in ``features``.
5. **Shape.** Geometric template matching: the mask, normalised for position (centroid) and scale
   (area), is compared by soft IoU with each shape's ideal outline at every rotation (3 degree steps
   over the shape's symmetry period, mirrored too; also the variants a person still calls by the shape's
   name: a ring with any hole, fatter stars, a thinner crescent; ``RING_HOLES``, ``STAR_INNER``,
   ``CRESCENT_BITES``). The best IoU names the shape when it reaches that
   shape's fit floor (``FIT``: what the world's own clean drawings reach, with a margin); below it the
   object is **distorted** (a blob, a fragment, a smear: no clean shape) and the judge names none
   (``shape=None``), which counts as a failure of the prompt.
6. **Colour.** The object colour's nearest named colour (RGB).

The ideal outlines come from the generator's own drawing code (the world's definition of each shape),
so the judge needs no data and no training.

Every verdict has a ``status``: ``clean`` (a shape is named), ``distorted`` (an object, but no clean
shape) or ``nothing`` (no single object: an empty field, noise, clutter). Low-contrast objects are still
found down to ``MIN_CONTRAST`` (a shape washed out to a fifth of the world's least contrast is still a
shape a person sees, and so not a failure).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import cv2
import numpy as np

from sage_lightning.shapesworld.generator import COLOURS, SHAPES, Scene, _mask, _star

CANVAS = 40  # side of the normalised frame (px)
CANVAS_AREA = 0.16 * CANVAS * CANVAS  # object area in the normalised frame
ANGLE_STEP = 3.0  # degrees
# rotational symmetry period of each shape's outline (degrees); 0 = fully symmetric
PERIODS: dict[str, float] = {
    "circle": 0, "ring": 0, "square": 90, "triangle": 120, "star": 72, "hexagon": 60, "cross": 90,
    "heart": 360, "crescent": 360, "arrow": 360,
}
MIN_CONTRAST = 14.0  # least RGB distance between object and background colour for an object to exist
MIN_AREA_FRAC = 0.01  # least object area, as a share of the image
MIN_COMPONENT_SHARE = 0.5  # the object must hold this share of all object-coloured pixels
MAX_BACKGROUND_RESIDUAL = 0.3  # median border distance to the background model, as a share of contrast
MAX_CLUTTER = 0.3  # share of non-object pixels as far from the background as half the object's contrast
# Outline variants a person still calls by the shape's name, which the world's model draws: a ring with any hole
# (hole radius as a share of the ring's; the generator's is 0.55; at equal area the fit is sensitive to the hole, so
# a fine grid), fatter stars (inner radius; the generator's is 0.42) and a thinner crescent (bite offset x, y and
# radius; the generator's is CRESCENT_BITE). Chosen on training-seed generator images (5,710,000 and 5,720,000).
RING_HOLES = (0.4, 0.45, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8)
STAR_INNER = (0.5, 0.58)
CRESCENT_BITES = ((0.3, -0.086, 0.9),)
MIN_IOU = 0.6  # below this best template IoU no shape is named, whatever the shape's fit floor
# Fit floor of each shape: below it the object is "distorted", not that shape. The 1st percentile of the
# best IoU on 2,000 fresh generator drawings (seed 424242) less 0.15, and never below 0.63 (reject blobs are
# under 0.62 with every shape: rejects.MAX_SHAPE_IOU). Measured by judge_calibration.py.
FIT: dict[str, float] = {
    "circle": 0.8, "square": 0.77, "triangle": 0.75, "star": 0.7, "heart": 0.76, "cross": 0.74, "hexagon": 0.79,
    "ring": 0.63, "crescent": 0.63, "arrow": 0.67,
}
CLEAN, DISTORTED, NOTHING = "clean", "distorted", "nothing"
INK_FRACTION, INK_MIN = 0.4, 60.0  # off-line colour distance that marks outline ("ink") pixels


@dataclass
class JudgeVerdict:
    """What the judge sees: ``shape`` and ``colour`` names (None when there is no recognisable object),
    ``status`` (``clean``: a shape is named; ``distorted``: an object that is no clean shape; ``nothing``: no
    single object), ``confidence`` (best template IoU, 0..1), ``margin`` (best minus second-best IoU of another shape),
    per-shape ``scores`` and contour ``features``."""

    shape: str | None
    colour: str | None
    status: str = NOTHING
    confidence: float = 0.0
    margin: float = 0.0
    scores: dict[str, float] = field(default_factory=dict)
    features: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- templates
def _normalise(mask: np.ndarray) -> np.ndarray | None:
    """Warp a coverage mask (float, 0..1) into the CANVAS frame: centroid at the centre, area CANVAS_AREA."""
    m = cv2.moments(mask.astype(np.float32))
    if m["m00"] <= 1e-6:
        return None
    cx, cy = m["m10"] / m["m00"], m["m01"] / m["m00"]
    s = np.sqrt(CANVAS_AREA / m["m00"])
    c = (CANVAS - 1) / 2.0
    warp = np.array([[s, 0, c - s * cx], [0, s, c - s * cy]], np.float32)
    flags = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    return cv2.warpAffine(mask.astype(np.float32), warp, (CANVAS, CANVAS), flags=flags,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)


def _variants(shape: str) -> list[dict]:
    """``_mask`` keyword sets of a shape's outlines: its own, then the variants above."""
    if shape == "star":
        return [{}] + [{"polygon": _star(inner=inner)} for inner in STAR_INNER]
    if shape == "crescent":
        return [{}] + [{"bite": bite} for bite in CRESCENT_BITES]
    return [{}]


@lru_cache(maxsize=1)
def _templates() -> tuple[np.ndarray, np.ndarray]:
    """All shapes' normalised outlines at every rotation (and mirrored): ``[T, CANVAS*CANVAS]``, class ids."""
    size = 128
    rows, labels = [], []
    for k, shape in enumerate(SHAPES):
        period = PERIODS[shape]
        angles = [0.0] if period == 0 else list(np.arange(0.0, period, ANGLE_STEP))
        for variant in _variants(shape):
            for angle in angles:
                scene = Scene(shape=shape, colour="red", size="large", background="plain",
                              background_colour="white", style="photo", center=(32.0, 32.0), radius=26.0,
                              rotation=float(angle))
                mask = _mask(scene, size, **variant)
                for mirrored in (False, True) if period == 360 else (False,):
                    t = _normalise(mask[:, ::-1] if mirrored else mask)
                    rows.append(t.ravel())
                    labels.append(k)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - (size - 1) / 2
    r = np.hypot(xx, yy) / (0.4 * size)
    for inner in RING_HOLES:  # a ring is any annulus: the world draws its hole at 0.55 of the radius
        rows.append(_normalise(((r <= 1) & (r > inner)).astype(np.float32)).ravel())
        labels.append(SHAPES.index("ring"))
    return np.clip(np.stack(rows), 0, 1).astype(np.float32), np.array(labels)


# ---------------------------------------------------------------------------------- segmentation
def _border_band(h: int, w: int, width: int) -> np.ndarray:
    band = np.zeros((h, w), bool)
    band[:width], band[-width:], band[:, :width], band[:, -width:] = True, True, True, True
    return band


def _fit_background(img: np.ndarray) -> np.ndarray:
    """A per-channel plane fitted to the border band: ``[H, W, 3]`` float32."""
    h, w, _ = img.shape
    band = _border_band(h, w, max(2, round(min(h, w) / 32)))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    xx, yy = xx / max(w - 1, 1) - 0.5, yy / max(h - 1, 1) - 0.5
    design = np.stack([np.ones_like(xx), xx, yy], -1)
    a, y = design[band], img[band]
    keep = np.ones(len(a), bool)
    coef = None
    for _ in range(2):
        coef, *_ = np.linalg.lstsq(a[keep], y[keep], rcond=None)
        resid = np.linalg.norm(y - a @ coef, axis=1)
        cut = max(3.0 * np.median(resid), 25.0)
        keep = resid <= cut
        if keep.sum() < 0.5 * len(a):  # the object covers much of the border: keep the plain fit
            keep = resid <= np.quantile(resid, 0.5)
    return (design @ coef).astype(np.float32)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros_like(mask, bool)
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == k


def _fill_small_holes(mask: np.ndarray, max_area: float) -> np.ndarray:
    inv = (~mask).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(inv, connectivity=4)
    out = mask.copy()
    h, w = mask.shape
    for k in range(1, n):
        x, y, bw, bh, area = stats[k]
        touches = x == 0 or y == 0 or x + bw == w or y + bh == h
        if not touches and area <= max_area:
            out[labels == k] = True
    return out


def segment(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float] | None:
    """``(mask bool [H,W], alpha float [H,W], object RGB, contrast)``, or None when there is no object."""
    f = img.astype(np.float32)
    h, w, _ = f.shape
    bg = _fit_background(f)
    diff = f - bg
    dist = np.linalg.norm(diff, axis=2)
    d8 = np.clip(dist, 0, 255).astype(np.uint8)
    thr, _ = cv2.threshold(d8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    rough = dist > max(float(thr), MIN_CONTRAST / 2)
    rough = cv2.morphologyEx(rough.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)) > 0
    rough = _largest_component(rough)
    if rough.sum() < MIN_AREA_FRAC * h * w:
        return None
    core = cv2.erode(rough.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))) > 0
    if core.sum() < 8:
        core = rough
    obj_delta = np.median(diff[core], axis=0)  # object colour minus background, where the object is
    contrast = float(np.linalg.norm(obj_delta))
    if contrast < MIN_CONTRAST:
        return None
    alpha = (diff @ obj_delta) / (contrast**2)
    mask = alpha > 0.5
    # "Ink": pixels far off the background-object colour line (outlines of drawings). An outline
    # straddles the boundary, so each ink pixel joins the side (object or background) that is nearer.
    perp = np.linalg.norm(diff - alpha[..., None] * obj_delta, axis=2)
    ink = (perp > max(INK_FRACTION * contrast, INK_MIN)) & (dist > MIN_CONTRAST)
    if ink.any() and (~ink & mask).any() and (~ink & ~mask).any():
        d_obj = cv2.distanceTransform((~(mask & ~ink)).astype(np.uint8), cv2.DIST_L2, 3)
        d_bg = cv2.distanceTransform((~(~mask & ~ink)).astype(np.uint8), cv2.DIST_L2, 3)
        mask = np.where(ink, d_obj <= d_bg, mask)
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, np.ones((2, 2), np.uint8)) > 0
    everything = int(mask.sum())
    mask = _largest_component(mask)
    area = int(mask.sum())
    if area < MIN_AREA_FRAC * h * w or area < MIN_COMPONENT_SHARE * everything:
        return None  # nothing, or no single object (noise, clutter)
    # A clean scene: the border fits the background model and little outside the object looks like it.
    band = _border_band(h, w, 2)
    if np.median(dist[band]) > MAX_BACKGROUND_RESIDUAL * contrast:
        return None
    if (dist[~mask] > 0.5 * contrast).mean() > MAX_CLUTTER:
        return None
    mask = _fill_small_holes(mask, max_area=max(4.0, 0.02 * area))
    obj_rgb = np.median(f[core & mask] if (core & mask).sum() >= 8 else f[mask], axis=0)
    return mask, np.clip(alpha, 0, 1) * mask, obj_rgb, contrast


# -------------------------------------------------------------------------------------- features
def contour_features(mask: np.ndarray) -> dict[str, float]:
    """Classic contour descriptors of a binary mask (outer contour of the largest region, holes)."""
    m8 = mask.astype(np.uint8)
    contours, hierarchy = cv2.findContours(m8, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return {}
    outer_ids = [i for i in range(len(contours)) if hierarchy[0][i][3] < 0]
    i = max(outer_ids, key=lambda j: cv2.contourArea(contours[j]))
    c = contours[i]
    area = float(mask.sum())
    perim = cv2.arcLength(c, True)
    hull = cv2.convexHull(c)
    hull_area = max(cv2.contourArea(hull), 1e-6)
    outer_area = max(cv2.contourArea(c), 1e-6)
    holes = [j for j in range(len(contours)) if hierarchy[0][j][3] == i]
    hole_area = sum(cv2.contourArea(contours[j]) for j in holes)
    approx = cv2.approxPolyDP(c, 0.04 * perim, True)
    defects_deep = 0
    max_defect = 0.0
    hull_idx = cv2.convexHull(c, returnPoints=False)
    if len(c) > 3 and hull_idx is not None and len(hull_idx) > 3:
        try:
            defects = cv2.convexityDefects(c, hull_idx)
        except cv2.error:
            defects = None
        if defects is not None:
            depth = np.asarray(defects).reshape(-1, 4)[:, 3] / 256.0
            scale = np.sqrt(outer_area)
            defects_deep = int((depth > 0.08 * scale).sum())
            max_defect = float(depth.max() / scale)
    (_, _), radius = cv2.minEnclosingCircle(c)
    rect = cv2.minAreaRect(c)
    # mirror symmetry: best IoU of the mask with its reflection about the centroid over 36 axes
    norm = _normalise(mask.astype(np.float32))
    sym = 0.0
    if norm is not None:
        flipped = norm[:, ::-1]
        ctr = ((CANVAS - 1) / 2.0, (CANVAS - 1) / 2.0)
        for ang in range(0, 180, 5):
            rot = cv2.warpAffine(flipped, cv2.getRotationMatrix2D(ctr, 2 * ang, 1.0), (CANVAS, CANVAS))
            inter, union = np.minimum(rot, norm).sum(), np.maximum(rot, norm).sum()
            sym = max(sym, float(inter / max(union, 1e-6)))
    return {
        "area": area,
        "circularity": float(4 * np.pi * outer_area / max(perim**2, 1e-6)),
        "vertices": float(len(approx)),
        "solidity": float(outer_area / hull_area),
        "deep_defects": float(defects_deep),
        "max_defect": max_defect,
        "holes": float(sum(cv2.contourArea(contours[j]) > 0.02 * outer_area for j in holes)),
        "hole_ratio": float(hole_area / outer_area),
        "circle_fill": float(outer_area / max(np.pi * radius**2, 1e-6)),
        "rect_fill": float(outer_area / max(rect[1][0] * rect[1][1], 1e-6)),
        "symmetry": sym,
    }


def nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    table = np.array([COLOURS[n] for n in names], np.float32)
    return names[int(np.argmin(np.linalg.norm(table - np.asarray(rgb, np.float32), axis=1)))]


# ------------------------------------------------------------------------------------------ judge
def shape_scores(mask: np.ndarray) -> dict[str, float]:
    """Best soft IoU of the normalised mask with each shape's outline over rotations (and mirror)."""
    norm = _normalise(mask.astype(np.float32))
    if norm is None:
        return {s: 0.0 for s in SHAPES}
    templates, labels = _templates()
    x = np.clip(norm.ravel(), 0, 1)[None]
    inter = np.minimum(templates, x).sum(1)
    union = np.maximum(templates, x).sum(1)
    iou = inter / np.maximum(union, 1e-6)
    best = np.full(len(SHAPES), 0.0)
    np.maximum.at(best, labels, iou)
    return {s: float(best[k]) for k, s in enumerate(SHAPES)}


def fit_floor(shape: str, min_iou: float = MIN_IOU) -> float:
    """The least best-template IoU at which ``shape`` is named (its ``FIT`` floor, at least ``min_iou``)."""
    return max(min_iou, FIT.get(shape, min_iou))


def judge_image(img: np.ndarray, min_iou: float = MIN_IOU, with_features: bool = True) -> JudgeVerdict:
    """Name the shape and colour of the single object in ``img`` (uint8 ``[H, W, 3]`` RGB, any size)."""
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"judge_image takes an RGB image [H, W, 3]; got shape {img.shape}")
    if img.dtype != np.uint8:
        raise ValueError(f"judge_image takes uint8 images; got {img.dtype} (scale [0,1] floats by 255)")
    seg = segment(img)
    if seg is None:
        return JudgeVerdict(shape=None, colour=None)
    mask, _alpha, obj_rgb, contrast = seg
    scores = shape_scores(mask)
    order = sorted(scores, key=scores.get, reverse=True)
    best, second = order[0], order[1]
    conf = scores[best]
    features = contour_features(mask) if with_features else {}
    features["contrast"] = contrast
    named = conf >= fit_floor(best, min_iou)
    return JudgeVerdict(
        shape=best if named else None, colour=nearest_colour(obj_rgb), status=CLEAN if named else DISTORTED,
        confidence=conf,
        margin=conf - scores[second], scores=scores, features=features,
    )


def judge_shapes(images: np.ndarray, min_iou: float = MIN_IOU) -> list[str | None]:
    """Shape names for a batch of uint8 images ``[N, H, W, 3]`` (None where no shape is recognised)."""
    return [judge_image(img, min_iou=min_iou, with_features=False).shape for img in images]


def judge_batch(images: np.ndarray, min_iou: float = MIN_IOU) -> list[JudgeVerdict]:
    return [judge_image(img, min_iou=min_iou) for img in images]


def to_uint8(images) -> np.ndarray:
    """``[N,3,H,W]``/``[N,H,W,3]`` float in [0,1] (tensor or array) or uint8 -> uint8 ``[N,H,W,3]``."""
    arr = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if arr.ndim == 4 and arr.shape[1] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(0, 2, 3, 1)
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


__all__ = ["JudgeVerdict", "judge_image", "judge_shapes", "judge_batch", "segment", "contour_features",
           "shape_scores", "nearest_colour", "to_uint8"]
