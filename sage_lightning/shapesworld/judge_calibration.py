"""Measure the judge's fit floors (``judge.FIT``) on fresh generator drawings.

``python -m sage_lightning.shapesworld.judge_calibration [--n 2000] [--seed 424242]`` prints, per shape, the
1st percentile of the best template IoU over drawings of that shape the judge names correctly, and the floor
``max(0.63, q01 - 0.15)`` that ``judge.FIT`` holds (reject blobs stay below ``rejects.MAX_SHAPE_IOU`` = 0.62, so
below every floor). The margin of 0.15 is what the generator model's own clean-looking outputs need on training
seeds (rings with a wider hole, stars and crosses with rounded points are still rings, stars and crosses).
The floors are written into ``judge.py`` by hand, so that the judge stays a fixed rule.
"""

from __future__ import annotations

import argparse

import numpy as np

from sage_lightning.shapesworld.generator import SHAPES, make_batch
from sage_lightning.shapesworld.judge import judge_image
from sage_lightning.shapesworld.rejects import MAX_SHAPE_IOU

MARGIN = 0.15


def fit_floors(n: int = 2000, seed: int = 424242) -> dict[str, float]:
    """``{shape: floor}`` from ``n`` fresh drawings (the judge's best IoU, with no floor applied)."""
    images, _, ids, _ = make_batch(n, seed=seed)
    best: dict[str, list[float]] = {s: [] for s in SHAPES}
    for image, k in zip(images, ids, strict=True):
        verdict = judge_image(image, min_iou=0.0, with_features=False)
        if max(verdict.scores, key=verdict.scores.get, default=None) == SHAPES[k]:
            best[SHAPES[k]].append(verdict.confidence)
    return {s: round(max(MAX_SHAPE_IOU + 0.01, float(np.percentile(v, 1)) - MARGIN), 2) for s, v in best.items() if v}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=424242)
    args = parser.parse_args(argv)
    print(fit_floors(args.n, args.seed))


if __name__ == "__main__":
    main()
