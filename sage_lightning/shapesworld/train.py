"""Train ShapesWorld's models with Lightning: ``python -m sage_lightning.shapesworld.train <stage>``
(``sage-shapesworld train``). The stages live in ``sage_lightning.shapesworld.training``, one module each.

Stages: ``text`` (CLIP's text tower taught to state each caption's attributes, then frozen), ``clip``
(contrastive tiny CLIP; its vision side against the frozen text tower), ``vae`` (4x AutoencoderKL),
``unet`` (text-conditioned latent diffusion on the frozen text tower and VAE). Each run
- resumes from ``shapesworld_work/<stage>/last.ckpt`` when it exists (model, optimizer, step);
- otherwise warm-starts from the shipped weights when they exist (weights only), else starts from seed;
- trains ``--max-steps`` more steps on freshly generated data (batch k of a run uses seed f(stage, step));
- exports the current weights to the shipped folder every ``--export-minutes`` and at the end, with
  its gate figure, into ``weights/world.json`` (cumulative step counts across runs and sessions).
"""

from __future__ import annotations

import argparse

from sage_lightning.errors import SageError
from sage_lightning.shapesworld.training import STAGES, RunOptions, train
from sage_lightning.shapesworld.training.base import log


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The ``train`` command's arguments."""
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--max-steps", type=int, default=1000, help="steps to train in this run (added)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--export-minutes", type=float, default=12.0, help="export interval (minutes)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--anneal", type=float, default=None, metavar="FRACTION",
                   help="cosine-anneal the lr to FRACTION x lr over this run's steps (e.g. 0.1)")
    p.add_argument("--fresh", action="store_true", help="ignore checkpoints and shipped weights")
    p.add_argument("--freeze-text", action="store_true",
                   help="clip: train the vision side only (the UNet depends on the text tower)")
    p.add_argument("--check-draws", type=int, default=None,
                   help="unet: judged samples at each export (default 100)")
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator: cpu (default), gpu, auto")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a module setting, also on resume (e.g. freeze_encoder=true, class_weight=3)")


def run_from_args(a: argparse.Namespace) -> dict:
    """Train as the parsed ``train`` command says; world.json after the run. SystemExit (one line) for a
    user's mistake."""
    options = RunOptions(threads=a.threads, export_minutes=a.export_minutes, batch_size=a.batch_size, lr=a.lr,
                         fresh=a.fresh, freeze_text=a.freeze_text, check_draws=a.check_draws, overrides=a.set,
                         accelerator=a.accelerator, anneal=a.anneal)
    try:
        world = train(a.stage, a.max_steps, options)
    except SageError as err:
        raise SystemExit(str(err)) from None
    log.info(f"{a.stage} done: {world['stages'].get(a.stage)}")
    return world


def main(argv: list[str] | None = None) -> None:
    """``python -m sage_lightning.shapesworld.train``."""
    p = argparse.ArgumentParser(prog="python -m sage_lightning.shapesworld.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(p)
    run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    main()
