"""CLIP score of the held-out images against their ORIGINAL prompts, with and without the universal token.

The metric is torchmetrics' ``CLIPScore``: ``100 * max(cos(image feature, text feature), 0)``, averaged.
Under DDP each rank scores its own share of the held-out prompts and torchmetrics synchronises the metric
state (sums of scores and counts) in ``compute()``; nothing is averaged per rank by hand.

Two things torchmetrics 1.9 does not do by itself, handled by :func:`sage_lightning.models.load_clip`
(the one door to weights): it accepts only a fixed list of hub names (not a local folder), and with
transformers 5 ``get_*_features`` return model outputs where it expects tensors. So the model always comes
in through ``CLIPScore``'s callable form, wrapped to return the projected feature tensors.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor
from torchmetrics.multimodal import CLIPScore

from sage_lightning.errors import SageError
from sage_lightning.flow_models import is_tiny_source
from sage_lightning.models import load_clip as load_clip_for_score

SCORE_KEYS = {True: "clip_score/with_token", False: "clip_score/without_token"}


class ClipScoreLogger(L.Callback):
    """Logs ``clip_score/with_token`` and ``clip_score/without_token`` every ``every_n_steps`` optimizer
    steps and at the end of training (also left in ``trainer.callback_metrics`` for the run's summary).

    Needs a module with ``held_out_evaluation(with_token)`` (:class:`UniversalTokenSearch`). Put it after
    ``ClampPerturbation`` in the callback list, so it scores the clamped token.

    Args:
        model: the CLIP model (see :func:`sage_lightning.models.load_clip`); ShapesWorld's CLIP by default.
        every_n_steps: how often (in optimizer steps) to score during training; 0: only at the end.
        local_files_only: never download (hub ids must be cached).
    """

    def __init__(self, model: str = "shapesworld", every_n_steps: int = 10, local_files_only: bool = False) -> None:
        if every_n_steps < 0:
            raise SageError(f"every_n_steps={every_n_steps} must be >= 0 (0: only at the end)")
        self.model, self.every_n_steps, self.local_files_only = model, every_n_steps, local_files_only
        self.metrics: dict[bool, CLIPScore] = {}
        self.scores: dict[str, float] = {}

    def load(self) -> None:
        if self.metrics:
            return
        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no loading bar on stderr: errors stay one line
        try:
            pair = load_clip_for_score(self.model, self.local_files_only)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        self.metrics = {flag: CLIPScore(model_name_or_path=lambda: pair) for flag in (True, False)}

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Refuses, before anything loads, to score a model's images with another world's CLIP."""
        source = getattr(pl_module, "diffusion_source", None)
        # the tiny random stacks read the real CLIP vocabulary and mean nothing: ShapesWorld's CLIP is fine for them
        if self.model == "shapesworld" and source not in (None, "shapesworld") and not is_tiny_source(source):
            raise SageError(
                f"ClipScoreLogger would score {source!r}'s images with ShapesWorld's CLIP: set its model to a "
                "CLIP for that model (a hub id such as openai/clip-vit-large-patch14, or a folder)"
            )

    def on_fit_start(self, trainer, pl_module) -> None:
        """Loads the CLIP model after the search's own set-up, so its input errors come first."""
        if not hasattr(pl_module, "held_out_evaluation"):
            raise SageError(f"ClipScoreLogger scores held-out prompts: {type(pl_module).__name__} has none")
        self.load()
        for metric in self.metrics.values():
            metric.to(pl_module.device)

    @torch.no_grad()
    def measure(self, pl_module) -> dict[str, Tensor]:
        """Score this rank's held-out images against their original prompts; synchronised across ranks."""
        scores = {}
        for with_token, metric in self.metrics.items():
            evaluation = pl_module.held_out_evaluation(with_token)
            metric.reset()
            if evaluation.targets:
                metric.update(evaluation.images.to(pl_module.device), [t.prompt for t in evaluation.targets])
            scores[SCORE_KEYS[with_token]] = metric.compute().detach().cpu()
        return scores

    def publish(self, trainer, scores: dict[str, Tensor]) -> None:
        trainer.callback_metrics.update(scores)
        self.scores = {k: float(v) for k, v in scores.items()}
        if trainer.is_global_zero and trainer.logger is not None:
            trainer.logger.log_metrics(self.scores, step=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.publish(trainer, self.measure(pl_module))

    def on_train_end(self, trainer, pl_module) -> None:
        self.publish(trainer, self.measure(pl_module))
