"""A pool of generator images encoded once by the frozen VAE: the UNet stage's training data.

Rendering and encoding each batch cost ~5x the UNet step on a CPU; the pool keeps each image's posterior
(mean, std, already times the VAE's scaling factor) and a fresh posterior sample is drawn per use. The pool
of refresh ``index`` is seeded by it, saved in the training folder and reloaded on resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sage_lightning.shapesworld.generator import SHAPES, make_batch

POOL_SEED = 5 * 10**8


@dataclass
class LatentPool:
    index: int
    mean: torch.Tensor  # [N, 4, 16, 16], scaled
    std: torch.Tensor  # [N, 4, 16, 16], scaled
    captions: list[str]
    ids: np.ndarray  # [N] shape ids

    @classmethod
    @torch.no_grad()
    def build(cls, index: int, size: int, vae, chunk: int = 250) -> LatentPool:
        means, stds, captions, ids = [], [], [], []
        device = next(vae.parameters()).device
        for k, start in enumerate(range(0, size, chunk)):
            images, caps, shape_ids, _ = make_batch(min(chunk, size - start), POOL_SEED + index * 1000 + k)
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float().to(device) / 255.0
            post = vae.encode(x * 2 - 1).latent_dist
            means.append((post.mean * vae.config.scaling_factor).cpu())
            stds.append((post.std * vae.config.scaling_factor).cpu())
            captions += caps
            ids.append(shape_ids)
        return cls(index, torch.cat(means), torch.cat(stds), captions, np.concatenate(ids))

    @classmethod
    def load_or_build(cls, folder: Path, index: int, size: int, vae) -> LatentPool:
        """The saved pool ``index`` from ``folder`` if it has ``size`` items, else a new one (then saved)."""
        path = folder / f"pool_{index}.pt"
        if path.exists():
            state = torch.load(path, map_location="cpu", weights_only=True)
            if len(state["captions"]) == size:
                return cls(index, state["mean"], state["std"], state["captions"], state["ids"].numpy())
        pool = cls.build(index, size, vae)
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("pool_*.pt"):
            old.unlink()
        tmp = path.with_suffix(".tmp")
        torch.save({"mean": pool.mean, "std": pool.std, "captions": pool.captions,
                    "ids": torch.from_numpy(pool.ids)}, tmp)
        tmp.rename(path)
        return pool

    def draw(self, rng: np.random.Generator, n: int, class_weights: np.ndarray | None = None) -> np.ndarray:
        """``n`` item indices; classes drawn with ``class_weights`` (uniform if None), items uniform within."""
        if class_weights is None:
            return rng.integers(len(self.captions), size=n)
        p = np.asarray(class_weights, dtype=np.float64)
        classes = rng.choice(len(SHAPES), size=n, p=p / p.sum())
        by_class = [np.flatnonzero(self.ids == c) for c in range(len(SHAPES))]
        return np.array([by_class[c][rng.integers(len(by_class[c]))] for c in classes])

    def sample(self, idx: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        """A fresh posterior sample of items ``idx``, [n, 4, 16, 16]."""
        i = torch.from_numpy(np.asarray(idx))
        return self.mean[i] + self.std[i] * torch.randn(self.mean[i].shape, generator=generator)
