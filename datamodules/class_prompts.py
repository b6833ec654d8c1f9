"""Class-prompt targets: (class, prompt, seed) triples, served to the search as batches of target ids.

An epoch is one attack iteration for every target still running. The queue asks the search which
targets are still running each time an epoch starts, so a finished target costs no more compute, and
under DDP it deals the running targets round-robin to the ranks, padding with -1 so that every rank
takes the same number of steps.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from sage_lightning.errors import SageError
from sage_lightning.targets import Target

PAD = -1


class TargetQueue(IterableDataset):
    """Yields ``LongTensor [batch_size]`` of target ids (``-1`` = padding) for this rank."""

    def __init__(self, running: Callable[[], list[int]], batch_size: int, rank: int = 0, world_size: int = 1):
        self.running, self.batch_size, self.rank, self.world_size = running, batch_size, rank, world_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        ids = sorted(self.running())
        per_step = self.batch_size * self.world_size
        padded = ids + [PAD] * (-len(ids) % per_step)
        for start in range(0, len(padded), per_step):
            chunk = padded[start : start + per_step]
            yield torch.tensor(chunk[self.rank :: self.world_size], dtype=torch.long)


def class_targets(
    known: list[str], classes: list[int], templates: list[str], seeds_per_class: int, base_seed: int,
    distinct_seeds: bool = False,
) -> list[Target]:
    """Targets (class, template, seed) in that order, each carrying its class index into ``known``; with
    ``distinct_seeds`` target i takes seed ``base_seed + i``, else every class the same ``seeds_per_class``."""
    combos = itertools.product(classes, templates, range(seeds_per_class))
    return [
        Target(i, known[c], template.format(known[c]), base_seed + (i if distinct_seeds else s), class_index=c)
        for i, (c, template, s) in enumerate(combos)
    ]


class ClassPromptDataModule(L.LightningDataModule):
    """Targets from class names and prompt templates, ``seeds_per_class`` seeds each.

    Args:
        classes: class names or indices (of the ensemble's class list), or the path of a text file
            with one class per line.
        templates: prompt templates, each with one ``{}`` for the class name.
        seeds_per_class: seeds per (class, template); seeds are ``base_seed, base_seed + 1, ...``.
        base_seed: the first seed.
        distinct_seeds: give every target its own seed (``base_seed + target index``) instead of the same
            ``seeds_per_class`` seeds for every class: with it, N targets hold N different z0, not
            ``seeds_per_class`` (statistics over targets then resample independent latents).
        batch_size: targets per step and device.
    """

    def __init__(
        self,
        classes: list[str | int] | str = "all",
        templates: list[str] | None = None,
        seeds_per_class: int = 1,
        base_seed: int = 0,
        batch_size: int = 1,
        distinct_seeds: bool = False,
    ) -> None:
        super().__init__()
        self.classes = classes
        self.templates = templates or ["a photo of a {}"]
        for template in self.templates:
            if template.count("{}") != 1:
                raise SageError(f"prompt template {template!r} must contain exactly one '{{}}' for the class name")
        if seeds_per_class < 1:
            raise SageError(f"seeds_per_class={seeds_per_class} must be at least 1")
        if batch_size < 1:
            raise SageError(f"batch_size={batch_size} must be at least 1")
        self.seeds_per_class, self.base_seed, self.batch_size = seeds_per_class, base_seed, batch_size
        self.distinct_seeds = distinct_seeds

    def class_indices(self, known: list[str]) -> list[int]:
        """The configured classes as indices into ``known`` (the ensemble's classes; names can repeat there, so an
        index, not a name, is the class); SageError if unknown."""
        from sage_lightning.surrogate import resolve_classes

        classes = self.classes
        if isinstance(classes, str) and classes != "all":
            path = Path(classes).expanduser()
            if not path.is_file():
                raise SageError(f"classes={classes!r} is not a file: give a list of class names or a text file")
            classes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if classes == "all":
            return list(range(len(known)))
        if not classes:
            raise SageError("the target list is empty: give at least one class in data.classes")
        return resolve_classes(classes, known)

    def targets(self, known: list[str]) -> list[Target]:
        """All targets, in a fixed order: class, then template, then seed."""
        return class_targets(known, self.class_indices(known), self.templates, self.seeds_per_class, self.base_seed,
                             self.distinct_seeds)

    def train_dataloader(self) -> DataLoader:
        search = self.trainer.lightning_module
        queue = TargetQueue(search.running_targets, self.batch_size, self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(queue, batch_size=None, num_workers=0)
