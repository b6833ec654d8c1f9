"""Benchmark: do the two referees agree on clean generator images? (issue 19 item 4, ">= 98%")

D (the world's default ensemble, as a search builds it: members, reject output, views) and the independent judge
look at ``--per-class`` fresh ShapesWorld images of every class, generated from seeds drawn from ``--base-seed``
(half "a photo of a {shape}", half captions of the world's grammar). They agree on an image when D declares a
failure exactly when the judge does not see the class (``metrics.judge_agreement``). Use seeds no training used
(training draws from 5,000,000-5,999,999). Prints the table; ``--grid`` writes the images they disagree on.

    python benchmarks/referee_agreement.py --per-class 30 --base-seed 9600000 --grid /tmp/disagree.png
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torchvision.utils import make_grid, save_image

from sage_lightning.metrics import judge_agreement
from sage_lightning.models import default_ensemble, load_diffusion
from sage_lightning.shapesworld.generator import SHAPES
from sage_lightning.shapesworld.judge import judge_shapes
from sage_lightning.shapesworld.report import draws, generate, world_defaults


def clean_items(per_class: int, base_seed: int) -> list[tuple[str, str, int]]:
    """``(shape, prompt, seed)``: the report's draws, each prompt the class template with probability 1/2."""
    rng = np.random.default_rng(base_seed + 1)
    return [(s, f"a photo of a {s}" if rng.random() < 0.5 else p, seed) for s, p, seed in draws(per_class, base_seed)]


def referee_rows(images: np.ndarray, shapes: list[str]) -> tuple[list[bool], list[str | None], list[str]]:
    """D's failure decision, the judge's verdict and each member's top-1 output for each image (uint8 [N, H, W, 3])."""
    ensemble = default_ensemble("shapesworld")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    target = torch.tensor([SHAPES.index(s) for s in shapes])
    failed, top = [], []
    with torch.no_grad():
        for start in range(0, len(x), 100):
            out = ensemble(x[start:start + 100], target[start:start + 100])
            failed += out.failed.tolist()
            top += ["/".join(ensemble.output_names[i] for i in member) for member in out.topk[:, :, 0].T.tolist()]
    return failed, judge_shapes(images), top


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--base-seed", type=int, default=9_600_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grid", default=None, help="PNG of the images D and the judge disagree on")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    items = clean_items(args.per_class, args.base_seed)
    images = generate(load_diffusion("shapesworld"), items, world_defaults(), batch=args.batch)
    shapes = [s for s, _, _ in items]
    failed, judged, top = referee_rows(images, shapes)
    summary = judge_agreement(failed, judged, shapes)
    print(f"\n{len(items)} clean images, {args.per_class} per class, seeds from --base-seed {args.base_seed}\n")
    print("| images | agree | rate | D fails, judge sees the class | D passes, judge sees another or nothing |")
    print("|---|---|---|---|---|")
    print(f"| {summary['images']} | {summary['agree']} | {summary['rate']:.1%} | {summary['d_fails_judge_sees_class']} "
          f"| {summary['d_passes_judge_sees_other']} |")
    disagree = [i for i, (f, j, s) in enumerate(zip(failed, judged, shapes, strict=True)) if f != (j != s)]
    for i in disagree:
        print(f"- image {i}: {shapes[i]!r} ({items[i][1]!r}, seed {items[i][2]}): judge {judged[i]!r}, "
              f"members' top-1 {top[i]}")
    if args.grid and disagree:
        tiles = torch.from_numpy(images[disagree]).permute(0, 3, 1, 2).float() / 255
        save_image(make_grid(tiles, nrow=8, padding=2), args.grid)
        print(f"disagreements: {args.grid}")
    return summary


if __name__ == "__main__":
    main()
