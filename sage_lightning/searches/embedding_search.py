"""What the two embedding searches share (universal token, prompt slots): step, box, start and loss in the
text encoder's own units (:mod:`sage_lightning.embedding`; METHOD.md, "Prompt-space search")."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from sage_lightning.embedding import (
    BOXES,
    INITS,
    LOSSES,
    STEP_UNITS,
    TableScale,
    check_choice,
    excluded_token_ids,
    initial_embedding,
    member_loss,
    table_scale,
)
from sage_lightning.errors import SageError
from sage_lightning.optim import SignSGD
from sage_lightning.searches.base import TargetSearch
from sage_lightning.surrogate import EnsembleOutput
from sage_lightning.surrogate.classnames import class_synonyms

TABLE_LR = 0.25  # a quarter of the table's entry std per entry (ShapesWorld: a step of norm 0.04; words: 0.10-0.36)
PAPER_LR = 0.05  # SAGE's pseudo-code


def resolve_init(init: str | None, init_word: str | None, default: str) -> str:
    """The starting-point rule: ``init``, else ``word`` when ``init_word`` is given, else ``default``; a word
    given with another rule is refused (it would be silently ignored)."""
    if init_word is not None and init not in (None, "word"):
        raise SageError(f"init_word={init_word!r} is only used with init: word (init is {init!r}): drop one")
    return init or ("word" if init_word is not None else default)


class EmbeddingSearch(TargetSearch):
    """A :class:`TargetSearch` whose adversarial rows are token embeddings (``adversarial_rows()`` ``[N, ..., D]``).

    Args:
        step_units: ``table`` (a sign step moves each entry by ``lr`` x its token table's entry std) or
            ``absolute`` (by ``lr``: the paper's 0.05).
        box: ``range`` (each entry within that dimension's range over the table's rows), ``norm`` (no longer
            than the table's longest row) or ``none`` (only a configured
            ``sage_lightning.callbacks.ClampPerturbation``).
        init: ``random_row`` (a row of the table, never a class name, plural or synonym), ``mean_noise``,
            ``zeros`` or ``word`` (``init_word``'s row).
        loss: ``paper`` (``1 - 2p`` / ``2p - 1``), ``log`` or ``margin``
            (:func:`~sage_lightning.embedding.member_loss`).
        init_seed: seed of the random starting points.
        lr: the sign step in ``step_units``; None: :data:`TABLE_LR` of the table's entry std (``table``), or the
            paper's 0.05 (``absolute``).
        **kwargs: :class:`TargetSearch`.
    """

    def __init__(
        self,
        step_units: str = "table",
        box: str = "range",
        init: str = "random_row",
        loss: str = "paper",
        init_seed: int = 0,
        lr: float | None = None,
        **kwargs,
    ) -> None:
        if lr is None:
            lr = TABLE_LR if step_units == "table" else PAPER_LR
        super().__init__(lr=lr, **kwargs)
        self.step_units = check_choice(step_units, STEP_UNITS, "step_units")
        self.box = check_choice(box, BOXES, "box")
        self.init = check_choice(init, INITS, "init")
        self.loss_kind = check_choice(loss, LOSSES, "loss")
        self.init_seed = init_seed
        self._scale: TableScale | None = None
        self._excluded: dict[tuple[str, ...], set[int]] = {}

    @property
    def scale(self) -> TableScale:
        """The text encoder's table in numbers (computed once, from the model in use)."""
        if self._scale is None:
            self._scale = table_scale(self.frozen.encoder)
        return self._scale

    def excluded_ids(self, names: list[str]) -> set[int]:
        """Token ids a random start never takes: special tokens, every class name of D (the target's among them),
        their plurals and synonyms, and ``names`` (cached)."""
        key = tuple(names)
        if key not in self._excluded:
            known = class_synonyms(self.frozen.ensemble.class_names)
            words = [w for name, synonyms in known.items() for w in (name, *synonyms)] + list(names)
            self._excluded[key] = excluded_token_ids(self.frozen.encoder.tokenizer, words)
        return self._excluded[key]

    def draw_start(self, seed: int, word: str | None = None, names: list[str] | None = None) -> Tensor:
        """A starting slot vector ``[D]`` as ``init`` says, drawn from a generator seeded with ``seed``, in the box."""
        generator = torch.Generator().manual_seed(int(seed))
        excluded = self.excluded_ids(names or []) if self.init == "random_row" else None
        start = initial_embedding(self.frozen.encoder, self.init, generator, excluded, self.scale, word)
        return self.scale.project(start, self.box)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return SignSGD(params, lr=self.lr, scale=self.scale.step_scale(self.step_units))

    def optimizer_step(self, *args, **kwargs) -> None:
        """The sign step, then the stepped rows back into the table's box (before any callback sees them)."""
        super().optimizer_step(*args, **kwargs)
        rows = self.stepped_targets.to(self.device)
        if self.box != "none" and rows.numel():
            with torch.no_grad():
                param = self.adversarial_rows()
                param[rows] = self.scale.project(param[rows], self.box)

    def surrogate(self, images: Tensor, cls: Tensor, towards: bool) -> EnsembleOutput:
        """D's output for ``images``, its loss the configured ``loss`` (towards ``cls`` or away from it)."""
        ensemble = self.frozen.ensemble
        probs_all = ensemble.member_probs(images)
        output = ensemble.from_probs(probs_all, cls, towards=towards)
        if self.loss_kind == "paper":
            return output
        per_sample = member_loss(probs_all, cls, self.loss_kind, towards)
        return dataclasses.replace(output, loss=per_sample.mean(), per_sample_loss=per_sample)
