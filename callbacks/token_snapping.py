"""Snap the adversarial slot [x] of prompt search to a natural word, every K sign steps (METHOD.md).

After each step, for the targets of this rank whose current word has had its K steps: the candidate
source proposes whole next words for the prompt so far, the one whose token embedding is nearest to
e_x (cosine) is appended (or, with ``rerank_top`` > 1, the one with the lowest real loss of D among that
many nearest), the slots restart, and the grown prompt is judged on S fresh seeds by the search.
Put it after :class:`sage_lightning.callbacks.ClampPerturbation` in the callback list, so it snaps the clamped e_x.
"""

from __future__ import annotations

import lightning as L
import torch

from sage_lightning.candidates import nearest
from sage_lightning.errors import SageError


class TokenSnapping(L.Callback):
    """Args: rerank_top: re-rank this many nearest candidates by their real loss (0 or 1: nearest wins)."""

    def __init__(self, rerank_top: int = 0) -> None:
        if rerank_top < 0:
            raise SageError(f"TokenSnapping rerank_top={rerank_top} must be >= 0")
        self.rerank_top = rerank_top

    def choose(self, pl_module, target: int) -> tuple[str | None, int]:
        """The word for ``target``'s slot and the UNet evaluations the choice cost (re-ranking)."""
        candidates, embeddings = pl_module.proposals(target)
        if not candidates:
            return None, 0
        order = nearest(pl_module.slots[target, 0].detach().cpu(), embeddings).tolist()
        if self.rerank_top <= 1 or len(order) == 1:
            return candidates[order[0]].word, 0
        few = [candidates[i].word for i in order[: self.rerank_top]]
        losses = pl_module.real_loss(target, few)
        best = int(torch.sort(losses, stable=True).indices[0])
        return few[best], len(few) * pl_module.cost.image()

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rounds = {}
        eval_cost = pl_module.eval_cost()
        for target in pl_module.snap_due(batch):
            word, cost = self.choose(pl_module, target)
            evaluation = None if word is None else pl_module.evaluate(target, [word])
            rounds[target] = (word, evaluation, cost + (0 if word is None else eval_cost))
        pl_module.conclude(rounds)  # collective: every rank calls it, with or without rounds
