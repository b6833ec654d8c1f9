"""Save ``checkpoints/last.ckpt`` after every iteration pass (epoch), so a killed search resumes."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class IterationCheckpoint(ModelCheckpoint):
    """Keeps exactly one file, ``last.ckpt``, rewritten at the end of every epoch (one attack iteration
    for every running target). A search has no validation metric, so there is no top-k to keep."""

    def __init__(self, dirpath: str) -> None:
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, enable_version_counter=False)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
