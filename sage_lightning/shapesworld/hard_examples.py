"""Training data for D from the generator itself (issue 19 item 2), on training seeds only.

Two sources, each written as an ``.npz`` of ``images`` (uint8 ``[N, 64, 64, 3]``) and ``labels`` (index into
``SHAPES + ["none"]``) that ``classifiers train --extra`` reads:

- ``pool``: fresh generator images (class prompts and captions), labelled by the judge: its shape where it
  sees a clean one, ``none`` otherwise.
- ``mine``: SAGE's *D-only* failures, the hard examples of adversarial training: finals of latent-search runs
  that D declared failures while the judge still sees the target's shape cleanly (``metrics.failure_kind``),
  labelled with the target. Every target's seed must lie in the training range (``TRAIN_SEEDS``), never in
  the ranges evaluation uses.

``combine`` concatenates such files, repeating some (hard examples are few).

    python -m sage_lightning.shapesworld.hard_examples pool --per-class 200 --seed 5300000 --out pool.npz
    python -m sage_lightning.shapesworld.hard_examples mine --out hard.npz RUN_FOLDER [RUN_FOLDER ...]
    python -m sage_lightning.shapesworld.hard_examples combine --out extra.npz pool.npz hard.npz:4
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from sage_lightning.errors import SageError
from sage_lightning.metrics import D_ONLY, failure_kind
from sage_lightning.shapesworld.generator import SHAPES
from sage_lightning.shapesworld.judge import judge_image
from sage_lightning.shapesworld.rejects import REJECT_NAME

TRAIN_SEEDS = range(5_000_000, 6_000_000)  # latent-search seeds D may learn from (evaluation: 9,000,000+)
LABELS = [*SHAPES, REJECT_NAME]


def judge_label(image: np.ndarray) -> int:
    """The judge's label of one RGB uint8 image: its shape's index where it sees a clean one, else ``none``."""
    verdict = judge_image(image, with_features=False)
    return LABELS.index(verdict.shape) if verdict.status == "clean" and verdict.shape else LABELS.index(REJECT_NAME)


def _read_rgb(path: Path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))


def mine(runs: list[Path]) -> tuple[np.ndarray, np.ndarray, Counter]:
    """The D-only failures of latent-search ``runs`` as (images, labels), and the count of each failure kind.

    Raises ``SageError`` when a record's seed lies outside ``TRAIN_SEEDS``: evaluation seeds must never reach
    D's training."""
    images, labels, kinds = [], [], Counter()
    for run in runs:
        results = Path(run) / "results.jsonl"
        if not results.is_file():
            raise SageError(f"{str(run)!r} has no results.jsonl; pass the folder of a finished latent search")
        for line in results.read_text().splitlines():
            record = json.loads(line)
            if record["seed"] not in TRAIN_SEEDS:
                raise SageError(f"{results}: seed {record['seed']} is outside the training seeds "
                                f"{TRAIN_SEEDS.start:,}-{TRAIN_SEEDS.stop - 1:,}; mine runs made with "
                                f"--data.init_args.base_seed {TRAIN_SEEDS.start} (or above)")
            if not record.get("found") or record.get("already_failing"):
                continue
            final = _read_rgb(Path(run) / record["image"])
            clean_shape = judge_image(_read_rgb(Path(run) / record["clean_image"]), with_features=False).shape
            kind = failure_kind(record["class"], clean_shape, judge_image(final, with_features=False).shape)
            kinds[kind] += 1
            if kind == D_ONLY:
                images.append(final)
                labels.append(LABELS.index(record["class"]))
    return _stack(images), np.array(labels, dtype=np.int64), kinds


def pool(per_class: int, seed: int, batch: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` fresh generator images per shape (half class prompts, half captions), judge-labelled."""
    from sage_lightning.models import load_diffusion
    from sage_lightning.shapesworld.report import draws, generate, world_defaults

    rng = np.random.default_rng(seed + 1)
    items = [(s, f"a photo of a {s}" if rng.random() < 0.5 else p, sd) for s, p, sd in draws(per_class, seed)]
    images = generate(load_diffusion("shapesworld"), items, world_defaults(), batch=batch)
    return images, np.array([judge_label(im) for im in images], dtype=np.int64)


def combine(parts: list[tuple[np.ndarray, np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate (images, labels, repeat) parts, each repeated ``repeat`` times."""
    return (np.concatenate([np.repeat(im, r, axis=0) for im, _, r in parts]),
            np.concatenate([np.repeat(lb, r) for _, lb, r in parts]))


def _stack(images: list[np.ndarray]) -> np.ndarray:
    return np.stack(images).astype(np.uint8) if images else np.zeros((0, 64, 64, 3), np.uint8)


def _save(out: str, images: np.ndarray, labels: np.ndarray) -> None:
    np.savez_compressed(out, images=images, labels=labels)
    counts = np.bincount(labels, minlength=len(LABELS)) if len(labels) else np.zeros(len(LABELS), int)
    print(f"{out}: {len(labels)} images; " + ", ".join(f"{n} {c}" for n, c in zip(LABELS, counts, strict=True)))


def _part(spec: str) -> tuple[np.ndarray, np.ndarray, int]:
    path, _, repeat = spec.partition(":")
    if not Path(path).is_file():
        raise SageError(f"{path!r} does not exist; pass .npz files written by `pool` or `mine` (FILE[:REPEAT])")
    data = np.load(path)
    return data["images"], data["labels"], int(repeat or 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sage_lightning.shapesworld.hard_examples", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pool", help="judge-labelled generator images")
    p.add_argument("--per-class", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", required=True)
    m = sub.add_parser("mine", help="D-only failures of latent-search runs on training seeds")
    m.add_argument("--out", required=True)
    m.add_argument("runs", nargs="+")
    c = sub.add_parser("combine", help="concatenate FILE[:REPEAT] parts")
    c.add_argument("--out", required=True)
    c.add_argument("parts", nargs="+")
    args = parser.parse_args(argv)
    try:
        if args.command == "pool":
            _save(args.out, *pool(args.per_class, args.seed))
        elif args.command == "mine":
            images, labels, kinds = mine([Path(r) for r in args.runs])
            print("failure kinds:", dict(kinds))
            _save(args.out, images, labels)
        else:
            _save(args.out, *combine([_part(s) for s in args.parts]))
    except SageError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
