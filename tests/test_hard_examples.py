"""D's training data from the generator (issue 19 item 2): SAGE's D-only failures on training seeds only."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sage_lightning.errors import SageError
from sage_lightning.shapesworld import hard_examples
from sage_lightning.shapesworld.generator import render, sample_scene


def _drawing(shape: str, seed: int) -> np.ndarray:
    return render(sample_scene(np.random.default_rng(seed), shape=shape))


def _run(tmp_path, rows):
    (tmp_path / "images").mkdir()
    lines = []
    for i, (cls, clean, final, seed) in enumerate(rows):
        Image.fromarray(clean).save(tmp_path / f"images/{i}_clean.png")
        Image.fromarray(final).save(tmp_path / f"images/{i}_final.png")
        lines.append(json.dumps({"class": cls, "seed": seed, "found": True, "already_failing": False,
                                 "clean_image": f"images/{i}_clean.png", "image": f"images/{i}_final.png"}))
    (tmp_path / "results.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_only_d_only_failures_become_hard_examples_labelled_with_their_target(tmp_path):
    star, heart = _drawing("star", 1), _drawing("heart", 2)
    empty = np.full_like(star, 128)
    run = _run(tmp_path, [("star", star, _drawing("star", 3), 5_000_001),  # judge still sees a star: D fooled
                          ("heart", heart, empty, 5_000_002),  # nothing drawn: the generator's failure
                          ("star", empty, star, 5_000_003)])  # clean image already wrong: pre-existing
    images, labels, kinds = hard_examples.mine([run])
    assert dict(kinds) == {"d_only": 1, "confirmed": 1, "pre_existing": 1}
    assert labels.tolist() == [hard_examples.LABELS.index("star")] and images.shape == (1, 64, 64, 3)


def test_evaluation_seeds_never_reach_training(tmp_path):
    star = _drawing("star", 1)
    run = _run(tmp_path, [("star", star, star, 9_000_000)])
    with pytest.raises(SageError, match="outside the training seeds"):
        hard_examples.mine([run])


def test_combine_repeats_parts_and_the_judge_labels_an_empty_field_none():
    a = (np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 1]), 1)
    b = (np.ones((1, 4, 4, 3), np.uint8), np.array([3]), 3)
    images, labels = hard_examples.combine([a, b])
    assert labels.tolist() == [0, 1, 3, 3, 3] and images.shape[0] == 5
    assert hard_examples.LABELS[hard_examples.judge_label(np.full((64, 64, 3), 90, np.uint8))] == "none"
    assert hard_examples.LABELS[hard_examples.judge_label(_drawing("heart", 4))] == "heart"
