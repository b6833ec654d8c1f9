"""``sage-shapesworld``: rebuild ShapesWorld's models from their seeds, or train one stage further.

    sage-shapesworld build [--clip-steps N --vae-steps N --unet-steps N] [--threads T]
    sage-shapesworld train {clip,vae,unet} --max-steps N [--threads T]
    sage-shapesworld report --out DIR       (PNG grid per class, every gate, random-sampling failure rates)

``build`` trains every stage from scratch (seeded; CLIP, then the VAE, then the UNet on both, then the
surrogate classifiers and the candidate-word LM) and overwrites the shipped weights; ``train``
continues one stage (Lightning checkpoint in ``shapesworld_work/<stage>/`` if present, else warm
start from the shipped weights). Gate figures are written to ``weights/world.json`` and printed.

Running time (measured on this project's 2-core CPU while shared, one thread per stage): CLIP batch 64
about 0.3-0.5 steps/s, VAE batch 16 about 0.5 steps/s, UNet batch 32 about 0.2 steps/s; so ``build``
with the default step counts takes on the order of two days of such a CPU (the UNet dominates) and
belongs on a GPU. Every stage exports as it goes, so any interrupted build still ships a world.
"""

from __future__ import annotations

import argparse
import json

from sage_lightning.shapesworld import train as T

BUILD_STEPS = {"clip": 3000, "vae": 6000, "unet": 30000}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="sage-shapesworld", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train every stage from scratch with its seed (hours on a CPU)")
    for stage, steps in BUILD_STEPS.items():
        b.add_argument(f"--{stage}-steps", type=int, default=steps)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--export-minutes", type=float, default=12.0)
    t = sub.add_parser("train", help="train one stage further (resumable)")
    T.add_train_args(t)
    sub.add_parser("report", help="judge the shipped world: grids, gates, per-class failure rates", add_help=False)
    a, rest = p.parse_known_args(argv)
    if a.command == "report":
        from sage_lightning.shapesworld import report

        report.main(rest)
        return
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if a.command == "train":
        T.run_from_args(a)
        return
    world = {}
    for stage in T.STAGES:
        world = T.train(stage, getattr(a, f"{stage}_steps"), threads=a.threads,
                        export_minutes=a.export_minutes, fresh=True)
    from sage_lightning.shapesworld import classifiers, lm

    for name in classifiers.NAMES:
        world = classifiers.train(name)
    world = lm.train()
    print(json.dumps(world, indent=2))


if __name__ == "__main__":
    main()
