"""ShapesWorld's world: generator determinism, captions, shipped weights (when present) and their manifest."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sage_lightning.shapesworld.generator import (
    COLOURS,
    IMAGE_SIZE,
    SHAPES,
    ShapesDataset,
    caption,
    make_batch,
    render,
    sample_scene,
)


def test_make_batch_is_deterministic_and_well_formed():
    a = make_batch(24, seed=3)
    b = make_batch(24, seed=3)
    c = make_batch(24, seed=4)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and np.array_equal(a[2], b[2]) and a[3] == b[3]
    assert not np.array_equal(a[0], c[0])
    images, captions, ids, scenes = a
    assert images.shape == (24, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    assert ids.dtype == np.int64 and [SHAPES[i] for i in ids] == [s.shape for s in scenes]
    assert len(captions) == 24


def test_make_batch_fixed_shape_and_size():
    images, _, ids, _ = make_batch(5, seed=0, size=96, shape="star")
    assert images.shape == (5, 96, 96, 3) and set(ids.tolist()) == {SHAPES.index("star")}


def test_captions_name_the_shape_and_true_colour():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = sample_scene(rng)
        text = caption(scene, rng)
        words = text.split()
        assert scene.shape in words
        named = [w for w in words if w in COLOURS]
        assert set(named) <= {scene.colour, scene.background_colour}
        assert scene.colour != scene.background_colour


def test_render_object_differs_from_background_and_stays_inside():
    rng = np.random.default_rng(1)
    for _ in range(50):
        scene = sample_scene(rng)
        cx, cy = scene.center
        assert scene.radius + 1 <= cx <= IMAGE_SIZE - scene.radius - 1
        assert scene.radius + 1 <= cy <= IMAGE_SIZE - scene.radius - 1
        img = render(scene)
        assert img.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and img.dtype == np.uint8
        assert np.array_equal(img, render(scene))


def test_dataset_items_are_deterministic():
    ds = ShapesDataset(10, seed=7)
    x, y = ds[3], ShapesDataset(10, seed=7)[3]
    assert torch.equal(x["image"], y["image"]) and x["caption"] == y["caption"] and x["shape"] == y["shape"]
    assert x["image"].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert 0.0 <= x["image"].min() <= x["image"].max() <= 1.0
    assert SHAPES[x["shape"]] in x["caption"].split()
    assert not torch.equal(ds[4]["image"], ShapesDataset(10, seed=8)[4]["image"])
    with pytest.raises(IndexError):
        ds[10]
