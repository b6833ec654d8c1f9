"""ShapesWorld's world: generator determinism, captions, shipped weights (when present) and their manifest."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from sage_lightning.shapesworld.generator import (
    COLOURS,
    IMAGE_SIZE,
    MIN_LUMA_CONTRAST,
    SHAPES,
    ShapesDataset,
    caption,
    luminance,
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


def _gray(colour: str) -> float:
    r, g, b = COLOURS[colour]
    return 0.299 * r + 0.587 * g + 0.114 * b  # cv2.cvtColor(RGB2GRAY)


def test_object_and_background_differ_in_luminance():
    """Equal-luminance pairs (red on blue, ...) vanish in grayscale, and so from the edge classifier's Canny map."""
    assert all(abs(luminance(c) - _gray(c)) < 1e-9 for c in COLOURS)
    rng = np.random.default_rng(2)
    scenes = [sample_scene(rng) for _ in range(1000)]
    scenes += [sample_scene(rng, colour=c) for c in COLOURS for _ in range(40)]  # a forced colour too
    for scene in scenes:
        assert abs(_gray(scene.colour) - _gray(scene.background_colour)) >= MIN_LUMA_CONTRAST
    assert {s.background_colour for s in scenes if s.colour == "red"} >= {"white", "black"}
    assert all(len({s.background for s in scenes if s.colour == c}) >= 2 for c in COLOURS)


def test_fresh_images_have_canny_edges():
    images, _, _, _ = make_batch(300, seed=4242)
    counts = [int((cv2.Canny(cv2.cvtColor(im, cv2.COLOR_RGB2GRAY), 100, 200) > 0).sum()) for im in images]
    assert min(counts) >= 40  # the edge classifier's input always shows the object


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


# ------------------------------------------------------------------------------------ shipped weights
from sage_lightning.shapesworld.shipped import SHAPESWORLD_DIR  # noqa: E402


def test_manifest_matches_shipped_files():
    from sage_lightning.shapesworld.world import check_manifest

    assert (SHAPESWORLD_DIR / "MANIFEST.json").exists(), "the shipped weights lost their manifest"
    assert check_manifest() == []


def test_world_json_records_defaults():
    import json

    path = SHAPESWORLD_DIR / "world.json"
    world = json.loads(path.read_text())
    assert world["defaults"]["num_inference_steps"] > 0 and world["defaults"]["guidance_scale"] > 1


def test_shipped_pipeline_loads_offline_and_generates():
    from sage_lightning.models import load_diffusion

    model = load_diffusion("shapesworld")
    assert model.text_encoder.config.vocab_size == 49408
    assert model.unet.config.cross_attention_dim == model.text_encoder.config.hidden_size
    assert all(p.dtype == torch.float32 for p in model.unet.parameters())
    pipe = model.pipeline()
    out = pipe("a photo of a red star", num_inference_steps=2, guidance_scale=3.0, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.isfinite(out.images).all()


def test_shipped_clip_loads_in_float32():
    from sage_lightning.shapesworld.world import load_clip, text_tower

    clip = load_clip()
    assert clip.config.text_config.eos_token_id == 49407
    assert all(p.dtype == torch.float32 for p in clip.parameters())
    te = text_tower(clip)
    assert te.config.hidden_size == clip.config.text_config.hidden_size


def test_shipped_weights_stay_small():
    import json

    total = json.loads((SHAPESWORLD_DIR / "MANIFEST.json").read_text())["total_bytes"]
    assert total < 45e6, f"shipped ShapesWorld weights take {total / 1e6:.1f} MB"


def test_shipped_tokenizer_is_the_clip_bpe():
    from transformers import CLIPTokenizer

    from sage_lightning.models import clip_tokenizer

    folder = SHAPESWORLD_DIR / "pipeline" / "tokenizer"
    text = ["a photo of a golden retriever", "an oil painting of a small red crescent on a textured background"]
    ours = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    kw = dict(padding="max_length", max_length=77, truncation=True)
    assert ours(text, **kw).input_ids == clip_tokenizer()(text, **kw).input_ids
    assert ours.pad_token_id == 49407
