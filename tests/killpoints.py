"""Run ``sage`` and SIGKILL it at a chosen point of a search (a test driver, one device only).

    python tests/killpoints.py POINT fit --config ...

POINT is one of:

* ``first_result``: right after the first result lines reach ``results.jsonl`` (for the class-prompt searches that is
  inside the first pass, before the first ``last.ckpt``);
* ``first_checkpoint``: just before the first ``checkpoints/last.ckpt`` is written;
* ``mid_pass``: after the first optimizer step that follows the first checkpoint (inside the second pass);
* ``before_summary``: after the last checkpoint, as the writer starts on ``summary.json``.

The patches only add a kill; what the run computes and writes is unchanged.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

POINTS = ("first_result", "first_checkpoint", "mid_pass", "before_summary")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _after(cls: type, name: str, when) -> None:
    """Wrap ``cls.name`` so that the process is killed right after a call for which ``when(self)`` holds."""
    original = getattr(cls, name)

    @functools.wraps(original)
    def wrapped(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if when(self):
            _die()
        return out

    setattr(cls, name, wrapped)


def _before(cls: type, name: str) -> None:
    original = getattr(cls, name)

    @functools.wraps(original)
    def wrapped(self, *args, **kwargs):
        _die()
        return original(self, *args, **kwargs)

    setattr(cls, name, wrapped)


def install(point: str) -> None:
    """Patch the classes so the process kills itself at ``point``."""
    from sage_lightning.callbacks.checkpoint import IterationCheckpoint
    from sage_lightning.callbacks.failure_writer import FailureWriter
    from sage_lightning.callbacks.prompt_writer import PromptResultWriter
    from sage_lightning.callbacks.token_writer import TokenWriter
    from sage_lightning.optim import SignSGD
    from sage_lightning.results import RunFolder

    if point == "first_result":
        _after(RunFolder, "append_results", lambda run: bool(run.read_results()))
    elif point == "first_checkpoint":
        _before(IterationCheckpoint, "_save_last_checkpoint")
    elif point == "mid_pass":
        saved: list[int] = []
        _after(IterationCheckpoint, "_save_last_checkpoint", lambda _: bool(saved.append(1)))
        _after(SignSGD, "step", lambda _: bool(saved))
    elif point == "before_summary":
        for cls in (FailureWriter, PromptResultWriter, TokenWriter):
            _before(cls, "on_fit_end")
    else:
        raise SystemExit(f"unknown kill point {point!r}: one of {', '.join(POINTS)}")


if __name__ == "__main__":
    install(sys.argv[1])
    from sage_lightning.cli import main

    main(sys.argv[2:])
