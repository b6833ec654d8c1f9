"""``sage-shapesworld``: rebuild ShapesWorld's models from their seeds, or train one stage further.

    sage-shapesworld build [--text-steps N --clip-steps N --vae-steps N --unet-steps N] [--threads T]
    sage-shapesworld train {text,clip,vae,unet} --max-steps N [--threads T] [--set KEY=VALUE]
    sage-shapesworld report --out DIR [--update-world]   (gates, PNG grids, random-sampling failure rates)

``build`` trains every stage from scratch (seeded): the text tower (then frozen), CLIP's vision side
against it, the VAE, the UNet on the frozen text tower and VAE, then the surrogate classifiers and the
candidate-word LM; it overwrites the shipped weights. ``train`` continues one stage from its full
training state (Lightning checkpoint, latent or image pool) in ``~/.cache/sage-lightning/shapesworld/
<stage>/`` (``SHAPESWORLD_WORK``) if present, else warm-starts from the shipped weights (a UNet trained
on another text tower starts from its seed). Gate figures are written to ``weights/world.json``.

Running time measured on this project's 2-core CPU while shared, one thread per stage: text batch 64
about 8 steps/s (500 steps in about a minute); CLIP batch 128 from its image pool 0.8-1.6 steps/s;
UNet batch 32 from its latent pool 1.2-1.9 steps/s (10,000 steps in 1.5-2.5 hours); building each pool
takes a few minutes.
"""

from __future__ import annotations

import argparse
import json

from sage_lightning.errors import SageError
from sage_lightning.shapesworld import train as T
from sage_lightning.shapesworld.training import STAGES, RunOptions, train

BUILD_STEPS = {"text": 500, "clip": 3000, "vae": 6000, "unet": 12000}


def main(argv: list[str] | None = None) -> None:
    """``sage-shapesworld``: build, train or report (see the module docstring)."""
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
    for stage in STAGES:
        # the text tower is trained first and frozen: CLIP's vision side and the UNet learn against it
        options = RunOptions(threads=a.threads, export_minutes=a.export_minutes, fresh=True,
                             freeze_text=stage == "clip")
        try:
            world = train(stage, getattr(a, f"{stage}_steps"), options)
        except SageError as err:
            raise SystemExit(str(err)) from None
    from sage_lightning.shapesworld import classifiers, lm

    for name in classifiers.NAMES:
        world = classifiers.train(name)
    world = lm.train()
    print(json.dumps(world, indent=2))


if __name__ == "__main__":
    main()
