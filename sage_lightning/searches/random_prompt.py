"""The baseline of prompt search: random whole words from the same candidate source, same units as SAGE.

Each round appends one word drawn uniformly from the candidate source's accepted proposals for the
prompt so far (the same source, filter and exclusions as SAGE) and judges the prompt on the same S fresh
seeds by the same majority rule (:class:`~sage_lightning.searches.prompt_rounds.PromptRounds`, what both
share). After L words without a failure a fresh chain starts from the template.
``match_sage_steps_per_word`` sets the number of rounds so that the baseline spends at most the
forward-equivalents of a full SAGE run (L words of K sign steps each, plus its prompt evaluations).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from sage_lightning.errors import SageError
from sage_lightning.searches.base import RUNNING
from sage_lightning.searches.prompt_rounds import PromptRounds

WORD_SEED_STRIDE = 1_000_003


class RandomWordSearch(PromptRounds):
    """Random natural prompts. No trainable parameters; one epoch = one word for every running target.

    Args:
        rounds: words drawn per target (over all chains); default ``max_words`` (one chain).
        match_sage_steps_per_word: if given, ``rounds`` = the most rounds that cost no more forward-equivalents
            than SAGE with this K (and the same L, S, sampler and grad_mode) spends on one target: a round is
            forwards only, a SAGE sign step also a backward (:meth:`SamplingCost.step`).
            ``"steps_per_word"``: this config's own K (``configs/prompt_random.yaml``, given after the SAGE config).
        **kwargs: :class:`~sage_lightning.searches.prompt_rounds.PromptRounds` (candidates, max_words, eval_seeds,
            ...; the SAGE config's slot settings are not this search's and are dropped with its class).
    """

    def __init__(
        self,
        *args,
        rounds: int | None = None,
        match_sage_steps_per_word: int | Literal["steps_per_word"] | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        if match_sage_steps_per_word == "steps_per_word":
            match_sage_steps_per_word = self.steps_per_word  # the SAGE config's K
        if match_sage_steps_per_word is not None:
            if match_sage_steps_per_word < 1:
                raise SageError(f"match_sage_steps_per_word={match_sage_steps_per_word} must be at least 1")
            sage_words = self.max_words * (match_sage_steps_per_word * self.cost.step() + self.eval_cost())
            rounds = sage_words // self.eval_cost()
        rounds = self.max_words if rounds is None else rounds
        if rounds < 1:
            raise SageError(f"rounds={rounds} must be at least 1")
        self.word_rounds = self.max_iterations = rounds

    def configure_optimizers(self):
        return None

    def setup(self, stage: str) -> None:
        if self.trainer.world_size > 1:
            raise SageError("RandomWordSearch runs on one device: drop --trainer.devices/strategy for the baseline")
        super().setup(stage)

    def exhausted(self, target: int) -> bool:
        return int(self.iterations[target]) >= self.word_rounds

    def random_word(self, target: int) -> str | None:
        candidates, _ = self.proposals(target)
        if not candidates:
            return None
        seed = self.targets[target].seed * WORD_SEED_STRIDE + 7919 * target + int(self.iterations[target])
        pick = torch.randint(len(candidates), (1,), generator=torch.Generator().manual_seed(seed))
        return candidates[int(pick)].word

    @torch.no_grad()
    def training_step(self, ids: Tensor, batch_idx: int) -> None:
        active = self.template_round(ids)
        rows = ids.clamp(min=0)
        due = [int(t) for t, a in zip(rows.tolist(), active.tolist(), strict=True) if a]
        words = {t: self.random_word(t) for t in due}
        self.count_steps(rows.cpu()[active])  # one more round: exhausted() sees it
        self.conclude(
            {t: (w, None if w is None else self.evaluate(t, [w]), 0 if w is None else self.eval_cost())
             for t, w in words.items()}
        )
        self.log("targets_done", float((self.status != RUNNING).sum()), prog_bar=True, batch_size=len(ids))
