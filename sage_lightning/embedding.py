"""Steps, boxes, starting points and losses of the embedding searches in the text encoder's own units.

SAGE's pseudo-code steps a free token embedding by 0.05 per entry and clamps it to [-2.5, 2.5]
(METHOD.md, "Prompt-space search"); those are fixed numbers, and a token table's entries are of
another size on every encoder (ShapesWorld's: std 0.020, row norms 0.10-0.36; one such step moves a token
farther than a whole word). Here the table of the model in use decides (:func:`table_scale`):

* **step** (``step_units="table"``): a sign step moves each entry by ``lr`` times the std of the entries of
  its encoder's table (SDXL: each of the two tables for its own share of the slot vector);
  ``"absolute"``: by ``lr`` itself (the paper's 0.05).
* **box**: ``"range"``: each entry between the smallest and the largest value that dimension takes over
  the table's rows; ``"norm"``: each encoder's share no longer than the table's longest row; ``"none"``:
  only a configured ``sage_lightning.callbacks.ClampPerturbation`` (the paper's [-2.5, 2.5]).
* **starting point** (:func:`initial_embedding`): ``"random_row"`` (a row of the table, never one of the
  excluded words: the target, the class names, their plurals and synonyms), ``"mean_noise"`` (the mean row
  plus Gaussian noise of each dimension's std over the rows), ``"zeros"`` or ``"word"`` (a given word's row).
* **loss** (:func:`member_loss`): ``"paper"`` (``1 - 2 p`` towards a target, ``2 p - 1`` away from a class),
  ``"log"`` (``-log p_t`` / ``-log(1 - p_c)``) or ``"margin"`` (logit margin); the last two do not
  saturate where the paper's is flat (``p_t`` near 0, ``p_c`` near 1).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from sage_lightning.errors import SageError

STEP_UNITS = ("table", "absolute")
BOXES = ("range", "norm", "none")
INITS = ("random_row", "mean_noise", "zeros", "word")
LOSSES = ("paper", "log", "margin")
LOG_EPS = 1e-6  # added to probabilities before a log: a saturated member gives a finite loss and a gradient


def check_choice(value: str, allowed: tuple[str, ...], name: str) -> str:
    """``value`` if it is one of ``allowed``; else a one-line SageError naming them."""
    if value not in allowed:
        raise SageError(f"{name}={value!r}: use one of {', '.join(allowed)}")
    return value


def _tables(encoder) -> list[Tensor]:
    """The token-embedding table of each text encoder of ``encoder`` (one; two for SDXL), float32 on the CPU."""
    parts = getattr(encoder, "parts", None) or [encoder]
    return [part.token_embedding.weight.detach().float().cpu() for part in parts]


@dataclass(frozen=True)
class TableScale:
    """An encoder's token-embedding table(s) in numbers, per entry of a slot vector ``[D]`` (SDXL: ``D1 + D2``).

    ``entry_std``: the std of all entries of the entry's own table (one value per table, repeated);
    ``low``/``high``: each dimension's smallest/largest value over the rows; ``mean_row``, ``dim_std``: each
    dimension's mean/std over the rows; ``max_norms``: each table's longest row; ``widths``: each table's share.
    """

    entry_std: Tensor
    low: Tensor
    high: Tensor
    mean_row: Tensor
    dim_std: Tensor
    max_norms: tuple[float, ...]
    widths: tuple[int, ...]

    def step_scale(self, units: str) -> Tensor | None:
        """Per-entry multiplier of ``lr`` in a sign step (``None``: ``lr`` alone, the paper's absolute units)."""
        return self.entry_std.clone() if check_choice(units, STEP_UNITS, "step_units") == "table" else None

    def project(self, rows: Tensor, box: str) -> Tensor:
        """``rows [..., D]`` moved into the box (a new tensor; ``"none"`` returns them unchanged)."""
        check_choice(box, BOXES, "box")
        if box == "range":
            return torch.maximum(torch.minimum(rows, self.high.to(rows)), self.low.to(rows))
        if box == "none":
            return rows
        pieces = []
        for piece, radius in zip(rows.split(list(self.widths), dim=-1), self.max_norms, strict=True):
            norm = piece.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            pieces.append(piece * (radius / norm).clamp(max=1.0))
        return torch.cat(pieces, -1)


def table_scale(encoder) -> TableScale:
    """:class:`TableScale` of a :class:`~sage_lightning.text.PromptEncoder` or ``XLPromptEncoder``'s tables."""
    tables = _tables(encoder)
    return TableScale(
        entry_std=torch.cat([torch.full((t.shape[1],), float(t.std())) for t in tables]),
        low=torch.cat([t.min(0).values for t in tables]),
        high=torch.cat([t.max(0).values for t in tables]),
        mean_row=torch.cat([t.mean(0) for t in tables]),
        dim_std=torch.cat([t.std(0) for t in tables]),
        max_norms=tuple(float(t.norm(dim=1).max()) for t in tables),
        widths=tuple(int(t.shape[1]) for t in tables),
    )


def excluded_token_ids(tokenizer, words: Iterable[str]) -> set[int]:
    """Token ids a random starting row must never be: the tokenizer's special tokens, and every token of each
    word and of its plurals (+s, +es) written alone or after a space."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    for word in words:
        for form in (word, word + "s", word + "es"):
            for text in (form, form.lower(), form.capitalize()):
                ids.update(int(i) for i in tokenizer(text, add_special_tokens=False).input_ids)
    return ids


def initial_embedding(
    encoder,
    how: str,
    generator: torch.Generator,
    excluded: set[int] | None = None,
    scale: TableScale | None = None,
    word: str | None = None,
) -> Tensor:
    """A starting slot vector ``[D]`` (float32, CPU) drawn as ``how`` says (module docstring).

    ``random_row`` draws a token id uniformly among those not in ``excluded`` (the same id for every table of
    SDXL: one word); ``mean_noise`` draws from ``generator`` too; ``word`` needs a one-token ``word``.
    """
    check_choice(how, INITS, "init")
    scale = scale or table_scale(encoder)
    if how == "zeros":
        return torch.zeros(len(scale.mean_row))
    if how == "mean_noise":
        noise = torch.randn(len(scale.mean_row), generator=generator)
        return scale.mean_row + scale.dim_std * noise
    if how == "word":
        if not word:
            raise SageError("init='word' needs init_word: give a one-token word, or another init")
        ids = encoder.word_ids(word)
        if len(ids) != 1:
            raise SageError(f"init_word {word!r} is {len(ids)} tokens: give a word that is one token")
        return encoder.embedding_rows(ids)[0].detach().float().cpu().clone()
    vocab = _tables(encoder)[0].shape[0]
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[[i for i in (excluded or set()) if 0 <= i < vocab]] = False
    choices = torch.nonzero(allowed).flatten()
    if not len(choices):
        raise SageError("init='random_row' has no row left: every token is excluded")
    pick = int(choices[torch.randint(len(choices), (1,), generator=generator)])
    return encoder.embedding_rows([pick])[0].detach().float().cpu().clone()


def member_loss(probs_all: Tensor, cls: Tensor, kind: str, towards: bool) -> Tensor:
    """Per-sample surrogate loss ``[B]`` from member probabilities ``[M, B, C]`` and classes ``cls [B]``.

    ``towards``: make the members see ``cls`` (universal token, target t); else drive them away from it
    (prompt search, class c). ``paper``: ``mean_m (1 - 2 p_m)`` / ``mean_m (2 p_m - 1)``; ``log``:
    ``-mean_m log p_m`` / ``-mean_m log (1 - p_m)``; ``margin``: the log-probability margin between ``cls`` and
    the best other class (equal to the logit margin), ``mean_m (max_other - z_cls)`` / ``mean_m (z_cls - max_other)``.
    """
    check_choice(kind, LOSSES, "loss")
    M, B, C = probs_all.shape
    idx = cls.to(probs_all.device).view(1, B, 1).expand(M, B, 1)
    p = probs_all.gather(-1, idx).squeeze(-1)  # [M, B]
    if kind == "paper":
        return ((1 - 2 * p) if towards else (2 * p - 1)).mean(0)
    if kind == "log":
        return -((p if towards else 1 - p) + LOG_EPS).log().mean(0)
    logp = (probs_all + LOG_EPS).log()
    own = logp.gather(-1, idx).squeeze(-1)
    other = logp.scatter(-1, idx, float("-inf")).max(-1).values
    return ((other - own) if towards else (own - other)).mean(0)
