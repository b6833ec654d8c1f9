"""Training pools: generator images rendered (and, for the UNet, encoded) once, reused for many steps.

Rendering a batch costs several times a CLIP or UNet step on a CPU, so each stage keeps a pool of the
generator's output and draws its batches from it; the pool of refresh ``index`` is seeded by it, saved in
the stage's training folder and reloaded on resume.
- ``ImagePool``: uint8 images, captions and shape ids (CLIP's vision side).
- ``LatentPool``: each image's VAE posterior (mean, std, already times the scaling factor); a fresh
  posterior sample is drawn per use (the UNet).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sage_lightning.shapesworld.generator import SHAPES, make_batch

POOL_SEED = 5 * 10**8
CHUNK = 250


def _chunks(index: int, size: int):
    """Seeded generator batches (images, captions, ids) making up pool ``index``."""
    for k, start in enumerate(range(0, size, CHUNK)):
        images, captions, ids, _ = make_batch(min(CHUNK, size - start), POOL_SEED + index * 1000 + k)
        yield images, captions, ids


def _load_or_build(folder: Path, stem: str, index: int, size: int, build: Callable[[], dict]) -> dict:
    """The saved pool ``index`` (a dict of tensors and captions) if it has ``size`` items, else ``build()``."""
    path = folder / f"{stem}_{index}.pt"
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        if len(state["captions"]) == size:
            return state
    state = build()
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{stem}_*.pt"):
        old.unlink()
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.rename(path)
    return state


@dataclass
class Pool:
    index: int
    captions: list[str]
    ids: np.ndarray  # [N] shape ids

    def draw(self, rng: np.random.Generator, n: int, class_weights: np.ndarray | None = None) -> np.ndarray:
        """``n`` item indices; classes drawn with ``class_weights`` (uniform if None), items uniform within."""
        if class_weights is None:
            return rng.integers(len(self.captions), size=n)
        p = np.asarray(class_weights, dtype=np.float64)
        classes = rng.choice(len(SHAPES), size=n, p=p / p.sum())
        by_class = [np.flatnonzero(self.ids == c) for c in range(len(SHAPES))]
        return np.array([by_class[c][rng.integers(len(by_class[c]))] for c in classes])


@dataclass
class ImagePool(Pool):
    images: torch.Tensor  # [N, H, W, 3] uint8

    @classmethod
    def load_or_build(cls, folder: Path, index: int, size: int) -> ImagePool:
        def build() -> dict:
            parts = list(_chunks(index, size))
            return {"images": torch.from_numpy(np.concatenate([p[0] for p in parts])),
                    "captions": [c for p in parts for c in p[1]],
                    "ids": torch.from_numpy(np.concatenate([p[2] for p in parts]))}

        state = _load_or_build(folder, "images", index, size, build)
        return cls(index, state["captions"], state["ids"].numpy(), state["images"])

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """Images [n, 3, H, W] in [0, 1], captions, shape ids [n]."""
        i = torch.from_numpy(np.asarray(idx))
        x = self.images[i].permute(0, 3, 1, 2).float() / 255.0
        return x, [self.captions[j] for j in idx], torch.from_numpy(self.ids[idx])


@dataclass
class LatentPool(Pool):
    mean: torch.Tensor  # [N, 4, 16, 16], scaled
    std: torch.Tensor  # [N, 4, 16, 16], scaled

    @classmethod
    def load_or_build(cls, folder: Path, index: int, size: int, vae) -> LatentPool:
        @torch.no_grad()
        def build() -> dict:
            device = next(vae.parameters()).device
            means, stds, captions, ids = [], [], [], []
            for images, caps, shape_ids in _chunks(index, size):
                x = torch.from_numpy(images).permute(0, 3, 1, 2).float().to(device) / 255.0
                post = vae.encode(x * 2 - 1).latent_dist
                means.append((post.mean * vae.config.scaling_factor).cpu())
                stds.append((post.std * vae.config.scaling_factor).cpu())
                captions += caps
                ids.append(shape_ids)
            return {"mean": torch.cat(means), "std": torch.cat(stds), "captions": captions,
                    "ids": torch.from_numpy(np.concatenate(ids))}

        state = _load_or_build(folder, "pool", index, size, build)
        return cls(index, state["captions"], state["ids"].numpy(), state["mean"], state["std"])

    def sample(self, idx: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        """A fresh posterior sample of items ``idx``, [n, 4, 16, 16]."""
        i = torch.from_numpy(np.asarray(idx))
        return self.mean[i] + self.std[i] * torch.randn(self.mean[i].shape, generator=generator)
