"""Save ``checkpoints/last.ckpt`` after every iteration pass (epoch), so a killed search resumes."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn


class IterationCheckpoint(ModelCheckpoint):
    """Keeps exactly one file, ``last.ckpt``, rewritten at the end of every epoch (one attack iteration
    for every running target). A search has no validation metric, so there is no top-k to keep.

    A pass is saved once per epoch. Lightning's own rule (skip while ``global_step`` has not moved) would
    never save the random baselines mid-run: they take no optimizer step, so their ``global_step`` stays 0.
    """

    def __init__(self, dirpath: str) -> None:
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, enable_version_counter=False)
        self._last_epoch_saved = -1

    def _should_skip_saving_checkpoint(self, trainer) -> bool:
        return (
            bool(trainer.fast_dev_run)
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking
            or self._last_epoch_saved == trainer.current_epoch
        )

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_epoch_saved = trainer.current_epoch
