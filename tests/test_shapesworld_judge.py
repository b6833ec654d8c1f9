"""ShapesWorld's geometric judge: accuracy on fresh images (fast version), blur, blanks, colours."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from sage_lightning.shapesworld.generator import COLOURS, SHAPES, Scene, make_batch, render
from sage_lightning.shapesworld.judge import judge_image, judge_shapes, to_uint8


@pytest.fixture(scope="module")
def fresh():
    images, _, ids, scenes = make_batch(200, seed=2024)
    return images, ids, scenes


def test_shape_accuracy_on_fresh_images(fresh):
    images, ids, _ = fresh
    pred = judge_shapes(images)
    acc = np.mean([p == SHAPES[i] for p, i in zip(pred, ids, strict=True)])
    assert acc >= 0.95, acc


def test_every_class_recognised(fresh):
    images, ids, _ = fresh
    pred = np.array([str(p) for p in judge_shapes(images)])
    for k, name in enumerate(SHAPES):
        hit = pred[ids == k] == name
        assert hit.size and hit.mean() >= 0.85, (name, hit.mean())


def test_colour_accuracy(fresh):
    images, _, scenes = fresh
    colours = [judge_image(img, with_features=False).colour for img in images[:80]]
    acc = np.mean([c == s.colour for c, s in zip(colours, scenes[:80], strict=True)])
    assert acc >= 0.95, acc


def test_blurred_images(fresh):
    images, ids, _ = fresh
    blurred = np.stack([cv2.GaussianBlur(img, (0, 0), 1.0) for img in images[:100]])
    acc = np.mean([p == SHAPES[i] for p, i in zip(judge_shapes(blurred), ids[:100], strict=True)])
    assert acc >= 0.9, acc


@pytest.mark.parametrize("value", [0, 128, 255])
def test_blank_image_has_no_shape(value):
    verdict = judge_image(np.full((64, 64, 3), value, np.uint8))
    assert verdict.shape is None and verdict.colour is None


def test_noise_and_gradient_without_object():
    rng = np.random.default_rng(0)
    noise = np.clip(128 + rng.normal(0, 6, (64, 64, 3)), 0, 255).astype(np.uint8)
    ramp = np.linspace(40, 200, 64, dtype=np.float32)
    gradient = np.stack([np.broadcast_to(ramp, (64, 64))] * 3, -1).astype(np.uint8)
    assert judge_image(noise).shape is None
    assert judge_image(gradient).shape is None


def test_single_scene_and_features():
    scene = Scene(shape="ring", colour="blue", size="large", background="plain", background_colour="white",
                  style="photo", center=(32.0, 32.0), radius=24.0, rotation=0.0, detail=1)
    v = judge_image(render(scene))
    assert (v.shape, v.colour) == ("ring", "blue")
    assert v.features["holes"] == 1 and v.confidence > 0.8 and set(v.scores) == set(SHAPES)


def test_other_sizes_and_float_input():
    images, _, ids, _ = make_batch(10, seed=7, size=96)
    assert np.mean([p == SHAPES[i] for p, i in zip(judge_shapes(images), ids, strict=True)]) >= 0.9
    floats = images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    assert np.array_equal(to_uint8(floats), images)
    assert len(COLOURS) == 8


def test_reject_drawings_are_distorted_or_nothing_never_a_shape():
    """Blobs, fragments and smears (rejects.py) are no clean shape: the judge says distorted (or nothing)."""
    from sage_lightning.shapesworld.rejects import KINDS, make_rejects

    verdicts = [judge_image(img, with_features=False) for img in make_rejects(80, seed=4321)]
    by_kind = {kind: verdicts[i :: len(KINDS)] for i, kind in enumerate(KINDS)}
    assert all(v.status == "nothing" and v.shape is None for v in by_kind["empty"])
    for kind in ("blob", "fragments", "smear"):
        named = [v.shape for v in by_kind[kind] if v.shape is not None]
        # blobs are drawn unlike every shape's outline; rendered (outline ink, shadow, paint blur) and segmented,
        # a few come out close enough to a heart or a triangle: measured 5 of 20 blobs, 1 fragment, 4 smears
        assert len(named) <= 6, (kind, named)
        assert any(v.status == "distorted" for v in by_kind[kind]), kind


def test_clean_drawings_are_clean_and_low_contrast_shapes_are_still_seen(fresh):
    """A shape washed out to a quarter of its contrast is still plainly visible, so still that shape."""
    images, ids, scenes = fresh
    assert all(judge_image(img, with_features=False).status == "clean" for img in images[:60])
    empties = np.stack([render(s, mask=np.zeros((64, 64), np.float32)) for s in scenes[:100]]).astype(np.float32)
    washed = np.rint(empties + 0.25 * (images[:100].astype(np.float32) - empties)).astype(np.uint8)
    acc = np.mean([p == SHAPES[i] for p, i in zip(judge_shapes(washed), ids[:100], strict=True)])
    assert acc >= 0.85, acc



def _annulus(scene: Scene, hole: float) -> np.ndarray:
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32) + 0.5
    r = np.hypot(xx - scene.center[0], yy - scene.center[1]) / scene.radius
    return ((r <= 1) & (r > hole)).astype(np.float32)


@pytest.mark.parametrize("shape", ["crescent", "ring"])
def test_thin_crescents_and_rings_are_still_that_shape(fresh, shape):
    """A thinner crescent or a ring with a thin band: the world's model draws them and a person still calls each by
    its name, so the judge must too (issue 19 item 3; before the outline variants both fell below their fit
    floors: 1 of 12 named)."""
    from dataclasses import replace

    from sage_lightning.shapesworld.generator import _mask

    scenes = [replace(s, shape=shape, size="large", radius=24.0, center=(32.0, 32.0)) for s in fresh[2][:12]]
    variant = {"crescent": lambda s: _mask(s, 64, bite=(0.3, -0.086, 0.9)), "ring": lambda s: _annulus(s, 0.74)}[shape]
    said = [judge_image(render(s, mask=variant(s)), with_features=False).shape for s in scenes]
    assert said.count(shape) == len(scenes), said


def test_generator_stars_rings_and_crescents_the_judge_used_to_miss():
    """Generator images on training seeds that a person names at once (blunt small stars, a thin ring, thin
    crescents; tests/data/judge_variants): the judge names every one (before the outline variants: 5 of 11)."""
    from pathlib import Path

    from sage_lightning.shapesworld.judge_set import eye_set

    images, labels, _ = eye_set(Path(__file__).parent / "data" / "judge_variants")
    said = [judge_image(img, with_features=False).shape for img in images]
    assert len(images) == 11 and said == labels, list(zip(labels, said, strict=True))
