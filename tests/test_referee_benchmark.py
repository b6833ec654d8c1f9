"""benchmarks/referee_agreement.py: D's decision and the judge's verdict stay aligned image by image."""

from __future__ import annotations

import numpy as np
from helpers import load_benchmark

from sage_lightning.metrics import judge_agreement
from sage_lightning.shapesworld.classifiers import NAMES
from sage_lightning.shapesworld.generator import SHAPES, render, sample_scene

referee_benchmark = load_benchmark("referee_agreement.py", "referee_benchmark")


def test_clean_items_are_seeded_and_mix_template_and_captions():
    items = referee_benchmark.clean_items(4, 123)
    assert items == referee_benchmark.clean_items(4, 123)
    assert [s for s, _, _ in items] == [s for s in SHAPES for _ in range(4)]
    templates = sum(p == f"a photo of a {s}" for s, p, _ in items)
    assert 0 < templates < len(items)
    assert items != referee_benchmark.clean_items(4, 124)


def test_rows_follow_their_images():
    """Clean drawings of each shape, then an empty field asked to be a star: D fails and the judge sees
    nothing on the empty one only (rows shifted by one image would disagree)."""
    rng = np.random.default_rng(7)
    drawings = [render(sample_scene(rng, shape=s)) for s in SHAPES]
    empty = np.full_like(drawings[0], 128)
    images = np.stack([*drawings, empty])
    shapes = [*SHAPES, "star"]
    failed, judged, top = referee_benchmark.referee_rows(images, shapes)
    assert failed[-1] and judged[-1] is None
    assert sum(failed[:-1]) <= 1 and sum(j == s for j, s in zip(judged[:-1], SHAPES, strict=True)) >= len(SHAPES) - 1
    assert len(top) == len(images) and all(t.count("/") == len(NAMES) - 1 for t in top)  # one top-1 per member
    assert judge_agreement(failed, judged, shapes)["agree"] >= len(images) - 2
