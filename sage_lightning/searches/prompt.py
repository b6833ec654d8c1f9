"""Prompt-space SAGE (METHOD.md, "Prompt-space search"): natural prompts the model fails to draw.

For each target (class c, template prompt p, seed s) the prompt grows one word at a time, up to L words
(the rounds, evaluation and stopping rule: :mod:`sage_lightning.searches.prompt_rounds`):

1. ``p + words + " [x] [y]"`` (:meth:`PromptSearch.slotted_prompt`; slots are written with ``text.slot``, so
   no word of a prompt is ever taken for one): the adversarial slot [x] and the look-ahead slot [y] take free
   embeddings ``e_x, e_y`` (the module's only trainable parameter, ``slots [N, 2, D]``), drawn from the
   token table (``init``; :class:`~sage_lightning.searches.embedding_search.EmbeddingSearch`). K sign-gradient
   steps in the table's units, kept in the table's box, minimise D's loss (``mean_m (2 p_m(c) - 1)``, or a
   non-saturating ``loss``); step i of a target generates from the latent of seed ``s + i * STEP_SEED_STRIDE``.
2. After K steps :class:`sage_lightning.callbacks.TokenSnapping` asks the candidate source for whole next words of
   ``p + words``, picks the one whose token embedding is nearest to ``e_x`` (cosine; optionally the
   best real loss among the few nearest), appends it and re-initialises the slots.
3. The grown prompt is generated from S fresh seeds (never used by the optimisation); it is a failure
   when D declares a failure on a strict majority of them. A failure ends the target (*found*); L
   words without one end it too (*exhausted*). [ours] Before the first step, the bare template is
   evaluated the same way (``check_template``): a class the model cannot draw at all is reported as
   found with no words, not credited to a word.

One epoch = one sign step for every running target. Under DDP each rank optimises its own targets;
snapped words, decisions and costs are gathered so every rank holds the same state.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sage_lightning.cost import FORWARD_EQUIVALENTS, Unit
from sage_lightning.errors import SageError
from sage_lightning.searches.base import EMBEDDING_BOX, FOUND, RUNNING, clamp_constraint
from sage_lightning.searches.embedding_search import EmbeddingSearch, resolve_init
from sage_lightning.searches.prompt_rounds import EVAL_SEED_BASE, PromptEvaluation, PromptRounds, majority
from sage_lightning.targets import seeded_latent
from sage_lightning.text import slot

__all__ = ["EVAL_SEED_BASE", "STEP_SEED_STRIDE", "PromptEvaluation", "PromptSearch", "majority"]

STEP_SEED_STRIDE = 1_000_003


class PromptSearch(PromptRounds, EmbeddingSearch):
    """SAGE's prompt search; trainable parameter ``slots [N_targets, 2, D]`` (e_x, e_y per target).

    Args:
        init: how e_x, e_y start, and restart after each snap (:class:`EmbeddingSearch`; default
            ``random_row``: a fresh row of the token table per target and word, never a class name or synonym;
            ``word`` when ``init_word`` is given).
        init_word: with ``init: word``, the slots start (and restart) at this word's token embedding.
        kwargs: :class:`~sage_lightning.searches.prompt_rounds.PromptRounds`'s (candidates, max_words L,
            steps_per_word K, eval_seeds S, synonyms, exclude_class_names, multi_token, check_template, judge,
            eval_batch_size), :class:`EmbeddingSearch`'s (step_units, box, loss, init_seed) and
            :class:`TargetSearch`'s (diffusion, ensemble, num_steps, guidance_scale, scheduler, grad_mode, lr,
            dtype, local_files_only); ``max_iterations`` is ``max_words * steps_per_word``.

    Example (the same as ``sage fit --config configs/prompt_search.yaml``)::

        search = PromptSearch(candidates=CausalLMCandidates("shapesworld"), max_words=4, steps_per_word=10)
        trainer = L.Trainer(max_epochs=41, callbacks=[ClampPerturbation(-2.5, 2.5), TokenSnapping()])
        trainer.fit(search, datamodule=ClassPromptDataModule(classes="all"))
    """

    def __init__(self, init: str | None = None, init_word: str | None = None, **kwargs) -> None:
        super().__init__(init=resolve_init(init, init_word, "random_row"), **kwargs)
        self.init_word = init_word

    # ----------------------------------------------------------------------------------- set-up
    def init_parameters(self) -> None:
        super().init_parameters()
        if self.init == "word" and self.init_word:
            ids = self.frozen.encoder.word_ids(self.init_word)
            if len(ids) != 1:
                raise SageError(
                    f"init_word={self.init_word!r} is {len(ids)} CLIP tokens: give a word that is one token"
                )
        self.slots = nn.Parameter(torch.stack([self.slot_starts(t) for t in range(len(self.targets))]))

    def slot_starts(self, target: int) -> Tensor:
        """Starting e_x, e_y ``[2, D]`` of ``target``'s next word: drawn from a generator seeded with the target's
        seed, its word count and the slot (so a resumed run draws the same), never its class name or a synonym."""
        t = self.targets[target]
        base = (self.init_seed * 1_000_003 + t.seed) * 1009 + 2 * len(self.words[target])
        names = [t.class_name, *self.synonyms.get(t.class_name, [])]
        return torch.stack([self.draw_start(base + k, self.init_word, names) for k in range(2)])

    @torch.no_grad()
    def reset_slots(self, target: int) -> None:
        """e_x, e_y of ``target`` restart (after each snapped word): :meth:`slot_starts`."""
        self.slots[target] = self.slot_starts(target).to(self.slots.device, self.slots.dtype)

    def word_appended(self, target: int) -> None:
        """A snapped word: the target's slots restart for its next word."""
        self.reset_slots(target)

    def adversarial_rows(self) -> nn.Parameter:
        """The parameter whose rows (one per target: ``[2, D]`` = e_x, e_y) the clamp callback acts on."""
        return self.slots

    def method_callbacks(self) -> list[str]:
        """Token snapping is part of the method (added when the config has none)."""
        return ["sage_lightning.callbacks.token_snapping.TokenSnapping"]

    def constraints(self) -> list[tuple[str, dict]]:
        """e_x, e_y in [-2.5, 2.5] (METHOD.md)."""
        return [clamp_constraint(EMBEDDING_BOX)]

    # ---------------------------------------------------------------------------------- prompts
    def slotted_prompt(self, target: int) -> str:
        """The prompt so far followed by the adversarial slot [x] and the look-ahead slot [y]."""
        return f"{self.prompt_of(target)} {slot('x')} {slot('y')}"

    def step_seeds(self, targets: list[int], offset: int = 0) -> list[int]:
        """Seed of each target's current sign step (``offset=-1``: its last step): its latent and its noise."""
        return [self.targets[t].seed + STEP_SEED_STRIDE * int(self.iterations[t] + offset) for t in targets]

    def step_latents(self, targets: list[int], offset: int = 0) -> Tensor:
        """Latent of each target's current sign step (``offset=-1``: its last step)."""
        shape = self.latent_shape()
        return torch.stack([seeded_latent(s, shape) for s in self.step_seeds(targets, offset)]).to(self.device)

    @torch.no_grad()
    def real_loss(self, target: int, words: list[str]) -> Tensor:
        """D's loss of ``prompt + word`` for each word, on the latent of the target's last step ``[len(words)]``."""
        z = self.step_latents([target], offset=-1).expand(len(words), -1, -1, -1)
        cond = self.prompt_embeddings([self.prompt_of(target, [w]) for w in words])
        images = self.generate(z, cond, self.step_seeds([target], offset=-1) * len(words))
        cls = self.class_index[target].expand(len(words)).to(self.device)
        return self.frozen.ensemble(images, cls).per_sample_loss.float().cpu()

    def iteration_cost(self, unit: Unit = FORWARD_EQUIVALENTS) -> int:
        """One sign step: a sampling call and a backward through each graphed step (:meth:`SamplingCost.step`)."""
        return self.cost.step(unit)

    # ------------------------------------------------------------------------------------ steps
    def snap_due(self, ids: Tensor) -> list[int]:
        """This rank's running targets whose current word has had its K sign steps."""
        rows = [int(i) for i in ids.tolist() if i >= 0]
        return [
            t
            for t in rows
            if self.status[t] == RUNNING
            and int(self.iterations[t]) >= self.steps_per_word * (len(self.words[t]) + 1)
        ]

    def training_step(self, ids: Tensor, batch_idx: int) -> Tensor:
        active = self.template_round(ids)
        rows = ids.clamp(min=0)
        targets = rows.tolist()
        prompts = [self.slotted_prompt(t) for t in targets]
        cond = self.frozen.encoder(prompts, {"x": self.slots[rows, 0], "y": self.slots[rows, 1]}).to(self.device)
        images = self.generate(self.step_latents(targets), cond, self.step_seeds(targets))
        output = self.surrogate(images, self.class_index[rows.cpu()].to(self.device), towards=False)
        slots = self.slots[rows]
        self.stop_if_not_finite(
            ids, {"slot embedding": slots, "loss": output.per_sample_loss, "probability": output.probs.transpose(0, 1)}
        )
        self.count_steps(rows.cpu()[active])
        self.log("loss", output.loss, prog_bar=True, batch_size=len(ids))
        self.log("targets_done", float((self.status != RUNNING).sum()), prog_bar=True, batch_size=len(ids))
        self.log("failures", float((self.status == FOUND).sum()), prog_bar=True, batch_size=len(ids))
        return self.step_loss(output.per_sample_loss, active.to(output.per_sample_loss.device))
