"""The labelled set the judge is checked on (issue 19 item 3): distorted images, not only clean drawings.

Two parts, each image labelled with a shape name, ``distorted`` (an object, but no clean shape) or ``nothing``
(no object):

1. **Rule-labelled drawings** (:func:`rule_set`, rebuilt from a seed, labelled by the drawing's own scene):
   clean drawings (their shape); the same drawings washed out towards their own background to 30% contrast
   (their shape: at least 36 RGB levels from the background, plainly visible); drawings shrunk to 60% of
   their radius (their shape); reject drawings (``rejects.py``): an empty field (``nothing``), blobs,
   fragments and smears (``distorted``).
2. **Generator outputs labelled by eye** (``tests/data/judge_eye.png`` + ``judge_eye.json``): images of the
   shipped world on evaluation seeds, random draws and SAGE's final images, each looked at by a person and
   labelled with what a person calls it (the JSON says which rows came from where).

``python -m sage_lightning.shapesworld.judge_set`` prints the judge's agreement with each part per label
kind (shape / distorted / nothing).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from sage_lightning.shapesworld.generator import SHAPES, make_batch, render
from sage_lightning.shapesworld.judge import DISTORTED, NOTHING, JudgeVerdict, judge_image
from sage_lightning.shapesworld.rejects import KINDS, make_rejects

EYE_SET = Path(__file__).resolve().parents[2] / "tests" / "data" / "judge_eye"
CONTRAST = 0.3
SHRINK = 0.6
TILE = 64


def rule_set(n: int = 100, seed: int = 8_080_808) -> tuple[np.ndarray, list[str], list[str]]:
    """``(images [N, 64, 64, 3] uint8, labels, parts)``: ``n`` each of clean, washed-out and shrunk drawings,
    and ``n`` reject drawings (the kinds in turn)."""
    images, _, ids, scenes = make_batch(n, seed=seed)
    empty = np.stack([render(s, mask=np.zeros((TILE, TILE), np.float32)) for s in scenes]).astype(np.float32)
    washed = np.rint(empty + CONTRAST * (images.astype(np.float32) - empty)).astype(np.uint8)
    shrunk = np.stack([render(replace(s, radius=s.radius * SHRINK)) for s in scenes])
    rejects = make_rejects(n, seed=seed + 1)
    shapes = [SHAPES[k] for k in ids]
    reject_labels = [NOTHING if KINDS[i % len(KINDS)] == "empty" else DISTORTED for i in range(n)]
    labels = shapes * 3 + reject_labels
    parts = ["clean"] * n + [f"contrast {CONTRAST}"] * n + [f"shrunk {SHRINK}"] * n + [
        f"reject {KINDS[i % len(KINDS)]}" for i in range(n)]
    return np.concatenate([images, washed, shrunk, rejects]), labels, parts


def eye_set(folder: Path = EYE_SET) -> tuple[np.ndarray, list[str], list[str]]:
    """``(images, labels, sources)`` of the by-eye part: tiles of ``images.png`` (row-major, 64 px) and the
    labels and sources of ``labels.json``."""
    from PIL import Image

    meta = json.loads((folder / "labels.json").read_text())
    sheet = np.asarray(Image.open(folder / "images.png").convert("RGB"))
    cols = sheet.shape[1] // TILE
    tiles = [sheet[(i // cols) * TILE:(i // cols + 1) * TILE, (i % cols) * TILE:(i % cols + 1) * TILE]
             for i in range(len(meta["labels"]))]
    return np.stack(tiles), list(meta["labels"]), list(meta["sources"])


def verdict_label(verdict: JudgeVerdict) -> str:
    """The judge's verdict in the set's labels: the shape name, ``distorted`` or ``nothing``."""
    return verdict.shape if verdict.shape is not None else verdict.status


def kind_of(label: str) -> str:
    return "shape" if label in SHAPES else label


def agreement(images: np.ndarray, labels: list[str]) -> dict[str, dict[str, int]]:
    """Per label kind (shape / distorted / nothing): images, judged exactly as labelled, and what else the
    judge said (``other shape``, ``distorted``, ``nothing``). A distorted image the judge calls ``nothing``
    (or the reverse) counts as agreement on "no clean shape" in ``no_shape_agree``."""
    table: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for image, label in zip(images, labels, strict=True):
        said = verdict_label(judge_image(image, with_features=False))
        row = table[kind_of(label)]
        row["images"] += 1
        row["agree"] += said == label
        if kind_of(label) != "shape":
            row["no_shape_agree"] += said in (DISTORTED, NOTHING)
        if said != label:
            row["judge: " + ("other shape" if said in SHAPES else said)] += 1
    return {k: dict(v) for k, v in table.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="images per part of the rule-labelled set")
    args = parser.parse_args(argv)
    parts = {"rule-labelled drawings": rule_set(args.n)[:2]}
    if (EYE_SET / "labels.json").exists():
        parts["generator outputs, labelled by eye"] = eye_set()[:2]
    for name, (images, labels) in parts.items():
        print(f"{name} ({len(labels)} images)")
        for kind, row in agreement(images, labels).items():
            rest = ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("images", "agree"))
            print(f"  {kind:9s} {row['agree']}/{row['images']} agree ({row['agree'] / row['images']:.0%}); {rest}")


if __name__ == "__main__":
    main()
