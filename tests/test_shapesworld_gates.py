"""ShapesWorld follows its prompts: the shipped text tower, CLIP and UNet against their gates.

These tests would have caught the defect of the first shipped world (a text tower left at its random
initialisation: every class prompt had the same states, and the UNet drew the same image whatever it
was asked): distinct text states, a fresh judged sample well above chance, and world.json's gate figures
reproduced by the report's own measurement.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sage_lightning.models import load_diffusion
from sage_lightning.shapesworld import gates as G
from sage_lightning.shapesworld.caption_labels import HEADS, labels
from sage_lightning.shapesworld.generator import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SIZES,
    STYLES,
    Scene,
    render,
    sample_scene,
)
from sage_lightning.shapesworld.shipped import SHAPESWORLD_DIR


@pytest.fixture(scope="module")
def world():
    return load_diffusion("shapesworld")


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads((SHAPESWORLD_DIR / "world.json").read_text())["stages"]["report"]


def _draw(world):
    pipe = world.pipeline()
    pipe.set_progress_bar_config(disable=True)
    defaults = json.loads((SHAPESWORLD_DIR / "world.json").read_text())["defaults"]

    def draw(prompts: list[str], seeds: list[int]) -> np.ndarray:
        out = pipe(prompts, num_inference_steps=defaults["num_inference_steps"],
                   guidance_scale=defaults["guidance_scale"], height=64, width=64, output_type="np",
                   generator=[torch.Generator().manual_seed(s) for s in seeds]).images
        return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)

    return draw


# ----------------------------------------------------------------------------------- measurement logic
def test_caption_labels_say_what_the_caption_says():
    scene = Scene("star", "red", "small", "gradient", "blue", "drawing", (32.0, 32.0), 10.0, 0.0)
    said = labels(scene, "a sketch of a small red star on a blue gradient background")
    assert said == {"shape": SHAPES.index("star"), "colour": list(COLOURS).index("red"),
                    "size": list(SIZES).index("small"), "style": STYLES.index("drawing"),
                    "background": BACKGROUNDS.index("gradient"), "background_colour": list(COLOURS).index("blue")}
    bare = labels(scene, "a star")
    assert bare["shape"] == SHAPES.index("star")
    assert all(bare[k] == HEADS[k] - 1 for k in HEADS if k != "shape")  # nothing else is said
    assert all(v == HEADS[k] - 1 for k, v in labels(scene, "").items())


def test_class_prompt_gate_tells_a_prompt_follower_from_a_prompt_ignorer():
    follower = G.generator_draw

    def ignorer(prompts, seeds):
        return np.stack([render(sample_scene(np.random.default_rng(s))) for s in seeds])

    good, images, names = G.class_prompt_gate(follower, per_class=3, seed=1)
    bad, _, _ = G.class_prompt_gate(ignorer, per_class=3, seed=1)
    assert images.shape == (len(SHAPES), 3, 64, 64, 3) and len(names) == len(SHAPES)
    assert good["class_prompt_judge_accuracy"] >= 0.95 and bad["class_prompt_judge_accuracy"] <= 0.4
    assert bad["prompt_vs_seed_change_ratio"] == 0.0  # the prompt changes nothing
    assert good["prompt_vs_seed_change_ratio"] > 0.2


# ---------------------------------------------------------------------------------- the shipped world
def test_class_prompts_give_distinct_text_states(world):
    h = G.text_states(world.text_encoder, G.class_prompts())
    seq = F.normalize(h.flatten(1), dim=-1)
    cos = (seq @ seq.T)[~torch.eye(len(SHAPES), dtype=torch.bool)]
    assert cos.max().item() < 0.9, f"class prompts' text states are near-identical (max cosine {cos.max():.3f})"


def test_text_tower_is_shipped_as_pipeline_encoder_and_clip_text_tower(world):
    from sage_lightning.shapesworld.world import load_clip, state_sha256, text_tower

    assert state_sha256(world.text_encoder) == state_sha256(text_tower(load_clip()))


def test_fresh_sample_follows_its_prompts(world):
    """4 fresh seeds per class (seeds neither training nor the report use): judged share well above chance."""
    figures, _, _ = G.class_prompt_gate(_draw(world), per_class=4, seed=31_337)
    assert figures["class_prompt_judge_accuracy"] >= 0.6, figures["class_prompt_judge_per_class"]


def test_world_json_gates_are_what_the_report_measures(world, recorded):
    per_class = recorded["class_prompt_draws"] // len(SHAPES)
    figures, _, _ = G.class_prompt_gate(_draw(world), per_class=per_class, seed=recorded["seed"])
    assert abs(figures["class_prompt_judge_accuracy"] - recorded["class_prompt_judge_accuracy"]) <= 0.01
    assert abs(figures["prompt_vs_seed_change_ratio"] - recorded["prompt_vs_seed_change_ratio"]) <= 0.01


def test_text_and_clip_gates_reproduce(world, recorded):
    from sage_lightning.shapesworld.world import load_clip

    text = G.text_gates(world.text_encoder)
    assert abs(text["linear_probe_shape_accuracy"] - recorded["linear_probe_shape_accuracy"]) <= 0.005
    assert abs(G.clip_zero_shot(load_clip()) - recorded["clip_zero_shot_shape_accuracy"]) <= 0.005
