"""Probe for issue 20: does the target's word steer ShapesWorld more before the class word than after it?

The world's text encoder attends causally (as CLIP's does): a word after the class word cannot change the class
word's own state. For every other shape, the held-out templates and ``--seeds`` seeds from ``--base-seed`` (one
seed per shape and copy), the judge's hit rate on the target and on the prompt's own shape with no word, the word
appended, and the word before the class word. Prints the table.

    python benchmarks/word_position.py --targets star,heart,cross --base-seed 9990001
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from sage_lightning.models import load_diffusion
from sage_lightning.shapesworld.generator import SHAPES
from sage_lightning.shapesworld.judge import judge_shapes
from sage_lightning.shapesworld.report import generate, world_defaults

TEMPLATES = ("a drawing of a {}", "a painting of a {}")  # the universal token's held-out templates
PLACEMENTS = ("none", "after", "before")


def prompts(target: str, placement: str, seeds: int, base_seed: int) -> list[tuple[str, str, int]]:
    """``(shape, prompt, seed)`` for every other shape, template and seed, the target's word placed as asked."""
    words = {"none": "{s}", "after": "{s} {t}", "before": "{t} {s}"}[placement]
    return [(s, template.format(words.format(s=s, t=target)), base_seed + 100 * copy + k)
            for k, s in enumerate(SHAPES) if s != target for template in TEMPLATES for copy in range(seeds)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="star,heart,cross")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--base-seed", type=int, default=9_990_001)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_diffusion("shapesworld")
    print("| target | prompts | " + " | ".join(f"word {p}: target / own shape" for p in PLACEMENTS) + " |")
    print("|---|---|" + "---|" * len(PLACEMENTS))
    for target in args.targets.split(","):
        cells = []
        for placement in PLACEMENTS:
            items = prompts(target, placement, args.seeds, args.base_seed)
            said = judge_shapes(generate(pipe, items, world_defaults(), batch=len(items)))
            hit = np.mean([x == target for x in said])
            own = np.mean([x == s for x, (s, _, _) in zip(said, items, strict=True)])
            cells.append(f"{hit:.0%} / {own:.0%}")
        print(f"| {target} | {len(items)} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
