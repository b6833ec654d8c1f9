"""What every ShapesWorld training stage shares: the LightningModule base (seeded batches from the global step,
pools refreshed on schedule, warm-up and optional cosine annealing, step logs) and the evaluation helpers."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset

from sage_lightning.shapesworld import world as W
from sage_lightning.shapesworld.gates import tokenize
from sage_lightning.shapesworld.generator import SHAPES, make_batch
from sage_lightning.shapesworld.judge import judge_shapes

STAGES = ("text", "clip", "vae", "unet")
STAGE_SEEDS = {"clip": 1, "vae": 2, "unet": 3, "text": 4}
EVAL_SEED = 10**9  # fresh images for gates: far from every training seed
log = logging.getLogger("shapesworld")


class Steps(Dataset):
    """Placeholder items: every batch is generated inside ``training_step`` from the global step."""

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, i: int) -> int:
        return i


def draw_images(n: int, seed: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """``n`` generator drawings of ``seed``: float images ``[n, 3, 64, 64]`` in [0, 1], captions, shape ids."""
    drawn, captions, ids, _ = make_batch(n, seed)
    x = torch.from_numpy(drawn).permute(0, 3, 1, 2).float() / 255.0
    return x, captions, torch.from_numpy(ids)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Float images ``[N, 3, H, W]`` in [0, 1] -> uint8 ``[N, H, W, 3]`` (the judge's input)."""
    return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def judge_accuracy(drawn: np.ndarray, ids: np.ndarray) -> float:
    """Share of uint8 images ``[N, H, W, 3]`` the geometric judge names as their shape ``ids``."""
    names = judge_shapes(drawn)
    return float(np.mean([n == SHAPES[i] for n, i in zip(names, ids, strict=True)]))


class WorldModule(L.LightningModule):
    """A training stage: ``trainable()`` is optimised, ``export()`` writes the shipped weights and returns the
    stage's gate figures for world.json. Steps count across runs (``base_steps`` + this run's)."""

    stage = ""
    wd = 0.0
    anneal: tuple[int, int, float] | None = None  # set by train() for one run; never saved in checkpoints

    def __init__(self, batch_size: int, lr: float, base_steps: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.t0 = time.time()
        self.last_log = (time.time(), 0)

    def images(self, n: int, seed: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """:func:`draw_images` on this module's device."""
        x, captions, ids = draw_images(n, seed)
        return x.to(self.device), captions, ids.to(self.device)

    def tokens(self, captions: list[str], pad_to_77: bool = True) -> torch.Tensor:
        """CLIP token ids of ``captions`` on this module's device."""
        return tokenize(captions, pad_to_77).to(self.device)

    @property
    def total_steps(self) -> int:
        """Steps trained across every run of this stage."""
        return self.hparams.base_steps + self.global_step

    def batch_seed(self) -> int:
        """The seed of this step's batch: a function of the stage and the total step."""
        return STAGE_SEEDS[self.stage] * 10**8 + self.total_steps * 7919 % 10**8

    def refreshed_pool(self, load_or_build: Callable):
        """The training pool of this step: ``load_or_build(folder, index)`` for refresh ``index`` (a new seed
        every ``pool_refresh`` steps); the old pool is dropped before the new one is built."""
        index = self.total_steps // self.hparams.pool_refresh
        if self.pool is None or self.pool.index != index:
            self.pool = None
            self.pool = load_or_build(W.WORK / self.stage, index)
        return self.pool

    def log_step(self, loss: torch.Tensor, **extra: float) -> None:
        """Log the loss every step and a line with ``extra`` figures, speed and lr every 25 steps."""
        self.log("loss", loss, prog_bar=True)
        if self.global_step % 25 == 0:
            now, step = time.time(), self.global_step
            rate = (step - self.last_log[1]) / max(now - self.last_log[0], 1e-9)
            self.last_log = (now, step)
            more = " ".join(f"{k}={v:.4g}" for k, v in extra.items())
            log.info(f"{self.stage} step {self.total_steps} (run {step}) loss {loss.item():.5f} {more} "
                     f"{rate:.3f} steps/s lr {self.optimizers().param_groups[0]['lr']:.2e}")

    def configure_optimizers(self):
        """AdamW on ``trainable()``; linear warm-up (100 steps from seed, 50 on a warm start), then constant or,
        with ``anneal``, cosine from lr to ``final * lr`` over this run's steps."""
        opt = torch.optim.AdamW(self.trainable().parameters(), lr=self.hparams.lr, weight_decay=self.wd)
        warm = 100 if self.hparams.base_steps == 0 else 50
        anneal = self.anneal

        def factor(s: int) -> float:
            f = min(1.0, (s + 1) / warm)
            if anneal is not None:  # cosine from 1 to `final` over this run's steps (start, steps, final)
                start, steps, final = anneal
                progress = min(max((s - start) / max(steps, 1), 0.0), 1.0)
                f *= final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))
            return f

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def trainable(self) -> torch.nn.Module:
        """The parameters this stage trains."""
        raise NotImplementedError

    def export(self) -> dict:
        """Write the shipped weights; the stage's figures for world.json (empty: nothing exported)."""
        raise NotImplementedError
