"""ShapesWorld training: pools, the text stage, and a UNet that is trained on the text tower it ships with.

The stages run as a user runs them (``sage-shapesworld train``), into temporary weights and training
folders (SHAPESWORLD_WEIGHTS, SHAPESWORLD_WORK), for a handful of steps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sage_lightning.shapesworld.generator import SHAPES
from sage_lightning.shapesworld.pools import ImagePool, LatentPool
from sage_lightning.shapesworld.shipped import SHAPESWORLD_DIR


def test_image_pool_is_seeded_saved_and_reloaded(tmp_path):
    pool = ImagePool.load_or_build(tmp_path, 3, 60)
    again = ImagePool.load_or_build(tmp_path, 3, 60)
    assert pool.images.shape == (60, 64, 64, 3) and pool.images.dtype == torch.uint8
    assert torch.equal(pool.images, again.images) and pool.captions == again.captions
    other = ImagePool.load_or_build(tmp_path, 4, 60)  # the next refresh: new images, old file replaced
    assert not torch.equal(pool.images, other.images)
    assert [p.name for p in tmp_path.iterdir()] == ["images_4.pt"]


def test_pool_draws_classes_by_weight(tmp_path):
    pool = ImagePool.load_or_build(tmp_path, 0, 200)
    only_star = np.eye(len(SHAPES))[SHAPES.index("star")]
    idx = pool.draw(np.random.default_rng(0), 50, only_star)
    assert set(pool.ids[idx].tolist()) == {SHAPES.index("star")}
    x, captions, ids = pool.batch(idx)
    assert x.shape == (50, 3, 64, 64) and 0 <= x.min() and x.max() <= 1
    assert all("star" in c for c in captions)


def test_latent_pool_keeps_the_posterior_and_samples_from_it(tmp_path):
    from sage_lightning.shapesworld.world import build_vae

    vae = build_vae(seed=0).eval()
    pool = LatentPool.load_or_build(tmp_path, 0, 20, vae)
    again = LatentPool.load_or_build(tmp_path, 0, 20, vae)
    assert pool.mean.shape == (20, 4, 16, 16) and torch.equal(pool.mean, again.mean)
    a = pool.sample(np.arange(4), torch.Generator().manual_seed(0))
    b = pool.sample(np.arange(4), torch.Generator().manual_seed(0))
    c = pool.sample(np.arange(4), torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a, pool.mean[:4], atol=float(6 * pool.std[:4].max()))


def _train(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sage_lightning.shapesworld.train", *args, "--threads", "1"],
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> tuple[dict, Path]:
    """A text stage from seed, then a UNet on it (a few steps each), in temporary folders."""
    weights = tmp_path_factory.mktemp("weights")
    shutil.copytree(SHAPESWORLD_DIR / "pipeline" / "vae", weights / "pipeline" / "vae")
    env = {**os.environ, "SHAPESWORLD_WEIGHTS": str(weights), "SHAPESWORLD_WORK": str(weights / "work")}
    text = _train(env, "text", "--max-steps", "30", "--fresh")
    assert text.returncode == 0, text.stdout[-2000:] + text.stderr[-2000:]
    unet = _train(env, "unet", "--max-steps", "3", "--set", "pool_size=40", "--set", "check_draws=10")
    assert unet.returncode == 0, unet.stdout[-2000:] + unet.stderr[-2000:]
    return env, weights


def test_text_stage_trains_only_the_text_tower(stages):
    from transformers import CLIPModel

    from sage_lightning.shapesworld.world import build_clip

    _, weights = stages
    trained, init = CLIPModel.from_pretrained(str(weights / "clip")), build_clip(seed=0)
    moved = {k for k, v in trained.state_dict().items() if not torch.allclose(v, init.state_dict()[k], atol=2e-3)}
    assert moved and all(k.startswith("text_model.") for k in moved), sorted(moved)[:5]
    figures = json.loads((weights / "world.json").read_text())["stages"]["text"]
    assert figures["steps"] == 30 and 0 < figures["linear_probe_shape_accuracy"] <= 1


def test_unet_ships_with_the_text_tower_it_was_trained_on(stages):
    from transformers import CLIPModel, CLIPTextModel

    from sage_lightning.shapesworld.world import state_sha256, text_tower

    _, weights = stages
    shipped_encoder = CLIPTextModel.from_pretrained(str(weights / "pipeline" / "text_encoder"))
    clip_tower = text_tower(CLIPModel.from_pretrained(str(weights / "clip")))
    assert state_sha256(shipped_encoder) == state_sha256(clip_tower)
    unet = json.loads((weights / "world.json").read_text())["stages"]["unet"]
    assert unet["text_tower_sha256"] == state_sha256(clip_tower)
    assert unet["steps"] == 3 and unet["curve"] == [[3, unet["judge_shape_accuracy"]]]
    assert set(unet["judge_per_class"]) == set(SHAPES)


def test_unet_refuses_to_resume_on_another_text_tower(stages):
    env, _ = stages
    text = _train(env, "text", "--max-steps", "2")  # the text tower moves on
    assert text.returncode == 0, text.stderr[-2000:]
    unet = _train(env, "unet", "--max-steps", "1", "--set", "pool_size=40", "--set", "check_draws=10")
    assert unet.returncode != 0
    assert "start over with --fresh" in unet.stdout + unet.stderr


def _optimizers_of_one_layer(anneal) -> dict:
    """``configure_optimizers()`` of a WorldModule with one linear layer (its optimizer and lr schedule)."""
    from sage_lightning.shapesworld.training import WorldModule

    class OneLayer(WorldModule):
        def __init__(self):
            super().__init__(batch_size=1, lr=1e-3, base_steps=5)
            self.layer = torch.nn.Linear(2, 2)

        def trainable(self):
            return self.layer

    module = OneLayer()
    module.anneal = anneal
    return module.configure_optimizers()


def _lr_at(parts: dict, step: int) -> float:
    sched = parts["lr_scheduler"]["scheduler"]
    sched.last_epoch = step - 1
    sched.step()
    return parts["optimizer"].param_groups[0]["lr"]


def test_anneal_cosine_decays_over_the_runs_steps_only():
    """--anneal 0.1 on a run resumed at step 100 for 1,000 steps: lr 1e-3 at 100, half-way at 600,
    1e-4 from 1,100 on; without it the lr stays at 1e-3 after the warm-up."""
    parts = _optimizers_of_one_layer((100, 1000, 0.1))
    assert _lr_at(parts, 100) == pytest.approx(1e-3)
    assert _lr_at(parts, 600) == pytest.approx(0.55e-3)
    assert _lr_at(parts, 1100) == pytest.approx(1e-4)
    assert _lr_at(parts, 5000) == pytest.approx(1e-4)
    plain = _optimizers_of_one_layer(None)
    assert _lr_at(plain, 600) == pytest.approx(1e-3) and _lr_at(plain, 5000) == pytest.approx(1e-3)


def test_anneal_fraction_outside_0_1_is_one_line_error():
    from sage_lightning.errors import SageError
    from sage_lightning.shapesworld.training import RunOptions, train

    with pytest.raises(SageError, match=r"--anneal 0.0: give the final learning rate as a fraction"):
        train("unet", 10, RunOptions(anneal=0.0))
