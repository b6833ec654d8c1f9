"""What a person sees while a search runs: targets done / total, failures so far, forward-equivalents per second
and an ETA, instead of Lightning's ``Epoch 20/20 1/-- 0.00it/s``.

One bar for the whole run (one epoch = one iteration of every running target, so a per-epoch bar says little);
one line above it per failure D declares (at most one line per finished target); nothing at all when standard
output is not a terminal (logs and CI stay clean; the writer's summary line still prints). The universal-token
search counts passes over its training prompts instead of targets.
"""

from __future__ import annotations

import datetime
import sys
import time

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

RUNNING, FOUND = 0, 1  # sage_lightning.searches.base's target states


def _is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def spent_forward_equivalents(module) -> float:
    """Forward-equivalents the search has used so far, over all targets (METHOD.md, "The cost unit")."""
    spent = getattr(module, "forward_equivalents_spent", None)  # the search's own count (sage_lightning.cost)
    return float(spent()) if spent is not None else 0.0


def eta_seconds(elapsed: float, done_iterations: int, remaining_iterations: int) -> float | None:
    """Time left at the rate so far, if every running target used its whole budget (an upper bound: targets
    stop early at a failure)."""
    if done_iterations <= 0 or elapsed <= 0:
        return None
    return elapsed / done_iterations * remaining_iterations


class _StatsTqdm(Tqdm):
    """A tqdm bar with a free ``{stats}`` field (tqdm's ``{postfix}`` prefixes a comma)."""

    stats = ""

    @property
    def format_dict(self) -> dict:
        return {**super().format_dict, "stats": self.stats}


class SearchProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, counting SAGE's targets (see module docstring).

    Args:
        refresh_rate: update the bar every this many steps.
        announce: print one line per failure found (above the bar).
    """

    def __init__(self, refresh_rate: int = 1, announce: bool = True) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=False)
        self.announce = announce
        if not _is_terminal():
            self.disable()
        self._start = 0.0
        self._start_iterations = 0
        self._start_spent = 0.0
        self._announced: set[int] = set()

    @staticmethod
    def counts_passes(module) -> bool:
        return hasattr(module, "held_out_evaluation")  # the universal token: passes over its prompts

    def progress(self, module) -> tuple[int, int]:
        """``(done, total)``: finished targets (or passes) out of all."""
        if self.counts_passes(module):
            return int(module.iterations.min()) if len(module.iterations) else 0, int(module.max_iterations)
        return int((module.status != RUNNING).sum()), len(module.targets)

    def init_train_tqdm(self) -> Tqdm:
        return _StatsTqdm(desc="targets", position=2 * self.process_position, disable=self.is_disabled, leave=True,
                          dynamic_ncols=True, file=sys.stdout, smoothing=0,
                          bar_format="{desc}{n_fmt}/{total_fmt} |{bar:20}| {stats}")

    def show(self, module) -> None:
        bar = self.train_progress_bar
        bar.n = self.progress(module)[0]
        bar.stats = self.stats(module)
        bar.refresh()

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._start = time.monotonic()
        self._start_iterations = int(pl_module.iterations.sum())
        self._start_spent = spent_forward_equivalents(pl_module)
        self._announced = set((pl_module.status == FOUND).nonzero().flatten().tolist())  # found before a resume
        self.train_progress_bar.reset(total=self.progress(pl_module)[1])
        self.train_progress_bar.set_description("passes" if self.counts_passes(pl_module) else "targets", False)
        self.show(pl_module)

    def on_train_epoch_start(self, trainer, *_) -> None:
        """One bar for the run: nothing to reset per epoch."""

    def stats(self, module) -> str:
        elapsed = time.monotonic() - self._start
        spent = spent_forward_equivalents(module) - self._start_spent
        parts = [] if self.counts_passes(module) else [f"failures {int((module.status == FOUND).sum())}"]
        if elapsed > 0 and spent > 0:
            parts.append(f"{spent / elapsed:,.1f} FE/s")
        running = module.status == RUNNING
        remaining = int((module.max_iterations - module.iterations[running]).clamp(min=0).sum())
        eta = eta_seconds(elapsed, int(module.iterations.sum()) - self._start_iterations, remaining)
        if eta is not None:
            parts.append(f"ETA ≤ {datetime.timedelta(seconds=round(eta))}")
        return " · ".join(parts)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar is None or bar.disable:
            return
        if self.announce and not self.counts_passes(pl_module):
            for target in (pl_module.status == FOUND).nonzero().flatten().tolist():
                if target not in self._announced:
                    self._announced.add(target)
                    t = pl_module.targets[target]
                    iterations = int(pl_module.iterations[target])
                    when = f"at iteration {iterations}" if iterations else "already failing before any search"
                    bar.write(f"failure: target {target} ({t.class_name}, seed {t.seed}) {when}")
        if self._should_update(batch_idx + 1, batch_idx + 1):
            self.show(pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        bar = self.train_progress_bar
        if bar is not None and not bar.disable:
            self.show(pl_module)

    def on_train_end(self, *_) -> None:
        self.train_progress_bar.close()
