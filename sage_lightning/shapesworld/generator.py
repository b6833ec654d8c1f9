"""ShapesWorld's procedural image generator: one coloured shape on a background, with captions.

Everything is seeded NumPy/OpenCV drawing. Shapes are drawn as masks at 4x resolution and reduced
with area averaging (anti-aliasing), then composited over a plain, gradient or textured background
in one of three styles (photo, drawing, painting).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "heart", "cross", "hexagon", "ring", "crescent", "arrow",
)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (30, 165, 60),
    "blue": (35, 70, 220),
    "yellow": (240, 215, 35),
    "orange": (245, 125, 20),
    "purple": (135, 45, 175),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
# object radius in px at 64 px
SIZES: dict[str, tuple[int, int]] = {"small": (14, 18), "medium": (19, 23), "large": (24, 28)}
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "texture")
STYLES: tuple[str, ...] = ("photo", "drawing", "painting")
IMAGE_SIZE = 64
SUPERSAMPLE = 4
MIN_CONTRAST = 120.0  # least RGB distance between object and background colour
# least grayscale luminance difference between object and background colour: with equal luminance (e.g. red on
# blue) the grayscale image, and so its Canny map (the edge classifier's input), shows no object
MIN_LUMA_CONTRAST = 40.0
GRAY_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)  # cv2.cvtColor(RGB2GRAY)


def _contrast(a: str, b: str) -> float:
    return float(np.linalg.norm(np.subtract(COLOURS[a], COLOURS[b], dtype=float)))


def luminance(colour: str) -> float:
    """Grayscale value of a palette colour, with ``cv2.cvtColor(RGB2GRAY)``'s weights."""
    return float(np.dot(GRAY_WEIGHTS, COLOURS[colour]))


def _luma_contrast(a: str, b: str) -> float:
    return abs(luminance(a) - luminance(b))


def _gradient_end(base: np.ndarray) -> np.ndarray:
    """The colour a gradient background fades to from ``base`` (darker for light, lighter for dark colours)."""
    return base * 0.55 if base.mean() > 128 else base + (255 - base) * 0.45


def _gradient_luma_contrast(a: str, b: str) -> float:
    """Least luminance distance from colour ``a`` to a gradient from ``b`` to its end colour (0 if inside)."""
    ends = (luminance(b), float(np.dot(GRAY_WEIGHTS, _gradient_end(np.array(COLOURS[b], np.float32)))))
    return max(min(ends) - luminance(a), luminance(a) - max(ends), 0.0)


# backgrounds allowed for each object colour: far in RGB and in grayscale luminance (for gradients, from the
# whole luminance range the gradient spans)
BACKGROUND_CHOICES: dict[str, tuple[str, ...]] = {
    c: tuple(b for b in COLOURS if b != c and _contrast(c, b) >= MIN_CONTRAST
             and _luma_contrast(c, b) >= MIN_LUMA_CONTRAST)
    for c in COLOURS
}
GRADIENT_CHOICES: dict[str, tuple[str, ...]] = {
    c: tuple(b for b in BACKGROUND_CHOICES[c] if _gradient_luma_contrast(c, b) >= MIN_LUMA_CONTRAST)
    for c in COLOURS
}
assert all(BACKGROUND_CHOICES.values()), "every colour needs a background"


def _background_choices(colour: str, background: str) -> tuple[str, ...]:
    return GRADIENT_CHOICES[colour] if background == "gradient" else BACKGROUND_CHOICES[colour]


@dataclass(frozen=True)
class Scene:
    """Everything that determines an image (besides the texture/noise seed ``detail``)."""

    shape: str
    colour: str
    size: str
    background: str
    background_colour: str
    style: str
    center: tuple[float, float]
    radius: float
    rotation: float
    detail: int = 0  # seed of the background texture, gradient direction and style noise

    @property
    def shape_id(self) -> int:
        return SHAPES.index(self.shape)


def sample_scene(rng: np.random.Generator, shape: str | None = None, colour: str | None = None) -> Scene:
    """A random scene at the 64 px reference scale (``render`` rescales to other sizes)."""
    if shape is not None and shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: use one of {', '.join(SHAPES)}")
    if colour is not None and colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}: use one of {', '.join(COLOURS)}")
    shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
    names = list(COLOURS)
    colour = colour or names[int(rng.integers(len(names)))]
    size = list(SIZES)[int(rng.integers(len(SIZES)))]
    lo, hi = SIZES[size]
    radius = float(rng.uniform(lo, hi))
    margin = radius + 2.0
    cx, cy = (float(rng.uniform(margin, IMAGE_SIZE - margin)) for _ in range(2))
    # background kinds with an allowed background colour (no gradient stays clear of e.g. green's luminance)
    kinds = [k for k in BACKGROUNDS if _background_choices(colour, k)]
    background = kinds[int(rng.integers(len(kinds)))]
    choices = _background_choices(colour, background)
    return Scene(
        shape=shape, colour=colour, size=size, background=background,
        background_colour=choices[int(rng.integers(len(choices)))],
        style=STYLES[int(rng.integers(len(STYLES)))],
        center=(round(cx, 2), round(cy, 2)), radius=round(radius, 2),
        rotation=round(float(rng.uniform(0, 360)), 1), detail=int(rng.integers(2**31)),
    )


# ------------------------------------------------------------------------------------------ masks
def _regular(n: int, phase: float = -np.pi / 2) -> np.ndarray:
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(t), np.sin(t)], 1)


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    t = -np.pi / 2 + np.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 120, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], 1)
    pts -= (pts.max(0) + pts.min(0)) / 2
    return pts / np.linalg.norm(pts, axis=1).max()


def _cross(w: float = 0.32) -> np.ndarray:
    return np.array([
        (-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w),
        (-w, -w),
    ], dtype=float) * 0.97


def _arrow() -> np.ndarray:
    pts = np.array([(-1, -0.22), (0.15, -0.22), (0.15, -0.6), (1, 0), (0.15, 0.6), (0.15, 0.22), (-1, 0.22)])
    return pts * 0.97


CRESCENT_BITE = (0.42, -0.12, 0.85)  # the crescent's bite: a circle at this offset (x, y) and radius, x the radius

POLYGONS: dict[str, np.ndarray] = {
    "square": _regular(4, np.pi / 4) * 0.97,
    "triangle": _regular(3) * 1.05,
    "star": _star(),
    "heart": _heart(),
    "cross": _cross(),
    "hexagon": _regular(6),
    "arrow": _arrow(),
}


def _mask(scene: Scene, size: int, polygon: np.ndarray | None = None,
          bite: tuple[float, float, float] = CRESCENT_BITE) -> np.ndarray:
    """Anti-aliased object coverage in [0, 1], ``size`` x ``size`` float32. ``polygon`` (unit outline) and ``bite``
    replace the shape's own outline; the judge uses them for variants of a shape (a fatter star, a thinner crescent)."""
    s = size / IMAGE_SIZE * SUPERSAMPLE
    hi = size * SUPERSAMPLE
    m = np.zeros((hi, hi), np.uint8)
    cx, cy, r = scene.center[0] * s, scene.center[1] * s, scene.radius * s
    a = np.deg2rad(scene.rotation)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    shift = 4  # sub-pixel precision of cv2 drawing
    f = 1 << shift

    def circle(x: float, y: float, rad: float, value: int) -> None:
        cv2.circle(m, (round(x * f), round(y * f)), round(rad * f), value, -1, cv2.LINE_8, shift)

    if scene.shape == "circle":
        circle(cx, cy, r, 255)
    elif scene.shape == "ring":
        circle(cx, cy, r, 255)
        circle(cx, cy, r * 0.55, 0)
    elif scene.shape == "crescent":
        circle(cx, cy, r, 255)
        dx, dy = rot @ np.array(bite[:2])
        circle(cx + dx * r, cy + dy * r, r * bite[2], 0)
    else:
        outline = POLYGONS[scene.shape] if polygon is None else polygon
        pts = outline @ rot.T * r + np.array([cx, cy])
        cv2.fillPoly(m, [np.round(pts * f).astype(np.int32)], 255, cv2.LINE_8, shift)
    return cv2.resize(m, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


# ------------------------------------------------------------------------------------- rendering
def _background(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    base = np.array(COLOURS[scene.background_colour], np.float32)
    img = np.broadcast_to(base, (size, size, 3)).copy()
    if scene.background == "gradient":
        ang = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1) - 0.5
        t = (np.cos(ang) * xx + np.sin(ang) * yy)[..., None]  # [-0.7, 0.7]
        other = _gradient_end(base)
        img = img + (other - base) * (t + 0.7) / 1.4
    elif scene.background == "texture":
        cells = int(rng.integers(4, 10))
        noise = rng.standard_normal((cells, cells)).astype(np.float32)
        noise = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
        freq = rng.uniform(6, 14)
        ang = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        stripes = np.sin(2 * np.pi * freq * (np.cos(ang) * xx + np.sin(ang) * yy))
        pattern = (0.6 * noise / (np.abs(noise).max() + 1e-6) + 0.4 * stripes)[..., None]
        img = img + pattern * 32.0
    return img


def render(scene: Scene, size: int = IMAGE_SIZE, mask: np.ndarray | None = None) -> np.ndarray:
    """The scene as an ``size`` x ``size`` x 3 uint8 RGB image.

    ``mask``: an object coverage ``[size, size]`` in [0, 1] drawn instead of the scene's shape (the reject
    drawings of ``rejects.py``: the same background, colour and style around another outline)."""
    rng = np.random.default_rng(scene.detail)
    bg = _background(scene, size, rng)
    alpha = _mask(scene, size) if mask is None else mask.astype(np.float32)
    colour = np.array(COLOURS[scene.colour], np.float32)
    fg = np.broadcast_to(colour, (size, size, 3)).copy()
    if scene.style == "photo":
        # soft directional light over the object and a faint drop shadow
        ang = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
        light = 1.0 + 0.18 * (np.cos(ang) * xx + np.sin(ang) * yy)[..., None]
        fg = fg * light
        shadow = np.roll(cv2.GaussianBlur(alpha, (0, 0), size / 40), (2, 2), (0, 1))
        bg = bg * (1.0 - 0.35 * shadow[..., None])
    elif scene.style == "painting":
        cells = int(rng.integers(5, 12))
        blot = cv2.resize(rng.standard_normal((cells, cells, 3)).astype(np.float32), (size, size),
                          interpolation=cv2.INTER_CUBIC)
        fg = fg + 18.0 * blot
        bg = cv2.GaussianBlur(bg, (0, 0), size / 90) + 8.0 * cv2.resize(
            rng.standard_normal((cells * 2, cells * 2, 3)).astype(np.float32), (size, size))
        alpha = cv2.GaussianBlur(alpha, (0, 0), size / 110)
    img = bg * (1.0 - alpha[..., None]) + fg * alpha[..., None]
    if scene.style == "drawing":
        # a dark (or, for black objects, light) outline along the object's boundary
        k = max(3, round(size / 64 * 3)) | 1
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
        edge = np.clip(cv2.dilate(alpha, kernel) - cv2.erode(alpha, kernel), 0, 1) * 0.85
        ink = np.array((235, 235, 235) if scene.colour == "black" else (20, 20, 20), np.float32)
        if scene.colour != "black" and scene.background_colour == "black":
            ink = np.array((128, 128, 128), np.float32)
        img = img * (1.0 - edge[..., None]) + ink * edge[..., None]
    if scene.style == "photo":
        img = img + rng.normal(0.0, 4.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# -------------------------------------------------------------------------------------- captions
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


STYLE_PHRASES: dict[str, tuple[str, ...]] = {
    "photo": ("a photo of", "a photograph of", "a picture of"),
    "drawing": ("a drawing of", "a sketch of", "an illustration of"),
    "painting": ("a painting of", "an oil painting of", "a watercolor of"),
}


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A varied caption that always names the shape; the other words are true of the scene."""
    words = []
    if rng.random() < 0.4:
        words.append(scene.size)
    if rng.random() < 0.8:
        words.append(scene.colour)
    words.append(scene.shape)
    noun = " ".join(words)
    if rng.random() < 0.65:
        phrases = STYLE_PHRASES[scene.style]
        text = f"{phrases[int(rng.integers(len(phrases)))]} {_article(noun)} {noun}"
    else:
        text = f"{_article(noun)} {noun}"
    if rng.random() < 0.5:
        bgc = scene.background_colour
        options = {
            "plain": (f"{bgc} background", f"plain {bgc} background", "plain background"),
            "gradient": (f"{bgc} background", f"{bgc} gradient background", "gradient background"),
            "texture": (f"{bgc} background", f"textured {bgc} background", "textured background"),
        }[scene.background]
        phrase = options[int(rng.integers(len(options)))]
        text = f"{text} on {_article(phrase)} {phrase}"
    return text


# ----------------------------------------------------------------------------------------- batches
def make_batch(
    n: int, seed: int, size: int = IMAGE_SIZE, shape: str | None = None,
) -> tuple[np.ndarray, list[str], np.ndarray, list[Scene]]:
    """``n`` images [n, H, W, 3] uint8, their captions, shape ids (int64) and scenes; seeded."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, shape=shape) for _ in range(n)]
    captions = [caption(s, rng) for s in scenes]
    images = np.stack([render(s, size) for s in scenes]) if n else np.zeros((0, size, size, 3), np.uint8)
    ids = np.array([s.shape_id for s in scenes], dtype=np.int64)
    return images, captions, ids, scenes


class ShapesDataset(Dataset):
    """``length`` items; item ``i`` depends only on (``seed``, ``i``).

    Each item: image [3,H,W] float in [0,1], caption, shape id.
    """

    def __init__(self, length: int, seed: int = 0, size: int = IMAGE_SIZE, shape: str | None = None):
        self.length, self.seed, self.size, self.shape = length, seed, size, shape

    def __len__(self) -> int:
        return self.length

    def item_rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, i])  # (seed, i), so datasets of nearby seeds do not overlap

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(i)
        rng = self.item_rng(i)
        scene = sample_scene(rng, shape=self.shape)
        text = caption(scene, rng)
        image = torch.from_numpy(render(scene, self.size)).permute(2, 0, 1).float() / 255.0
        return {"image": image, "caption": text, "shape": scene.shape_id}


__all__ = [
    "SHAPES", "COLOURS", "SIZES", "BACKGROUNDS", "STYLES", "IMAGE_SIZE", "Scene", "sample_scene", "render",
    "caption", "make_batch", "ShapesDataset", "luminance",
]
