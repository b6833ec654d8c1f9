"""What prompt-space SAGE and its random-word baseline share: prompts that grow one whole word per round.

A target (class c, template prompt p, seed s) holds the words appended so far; each round appends one word
(chosen by the search) and judges the grown prompt on S fresh seeds (:meth:`PromptRounds.evaluate`): it is a
failure when D declares one on a strict majority of them (:func:`majority`). A failure ends the target
(*found*); L words without one end it too (*exhausted*). [ours] Before the first round the bare template is
judged the same way (``check_template``): a class the model cannot draw at all is reported as found with no
words, not credited to a word. Under DDP the rounds' words, decisions and costs are gathered so every rank
holds the same state (:meth:`PromptRounds.conclude`). How a word is chosen is the subclass's:
:class:`~sage_lightning.searches.prompt.PromptSearch` (sign steps on slot embeddings, then snapping) or
:class:`~sage_lightning.searches.random_prompt.RandomWordSearch` (a random candidate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sage_lightning.candidates import Candidate, CandidateSource, WordFilter
from sage_lightning.cost import FORWARD_EQUIVALENTS, UNET_EVALUATIONS, Unit
from sage_lightning.errors import SageError
from sage_lightning.sampler import FullGradient
from sage_lightning.searches.base import EXHAUSTED, FOUND, RUNNING, TargetSearch, all_gather_objects
from sage_lightning.summary import majority
from sage_lightning.surrogate.classnames import class_synonyms
from sage_lightning.targets import seeded_latent

EVAL_SEED_BASE = 2_000_000_000  # fresh seeds: far from every seed a target or a step uses


@dataclass
class PromptEvaluation:
    """A prompt generated from the S evaluation seeds of a target (all on CPU)."""

    target: int
    prompt: str
    words: int  # words appended to the template in this prompt
    images: Tensor  # [S, 3, H, W]
    decisions: Tensor  # [S] bool: D declares a failure
    probs: Tensor  # [M, S] each member's probability of the class
    judged: list[str | None] | None  # the independent judge's names per seed (None: no judge)

    @property
    def failed(self) -> bool:
        return majority(self.decisions.tolist())


class PromptRounds(TargetSearch):
    """Prompts grown word by word and judged on S fresh seeds (see module docstring).

    Args:
        candidates: the candidate-word source (:mod:`sage_lightning.candidates`). Required.
        max_words: L, words appended at most per target (per chain).
        steps_per_word: K, sign-gradient steps on the slots before each word (the baseline matches its budget).
        eval_seeds: S, fresh seeds a prompt is judged on (strict majority decides).
        synonyms: ``{class: [words]}`` never proposed for that class (the class name never is, nor, for
            ImageNet, any WordNet lemma of its synset: :func:`~sage_lightning.surrogate.classnames.class_synonyms`).
        exclude_class_names: also never propose any other class name of D or its synonyms (a prompt that
            names another class is not a failure of the model).
        multi_token: ``drop`` (candidates must be one CLIP token) or ``mean`` (see candidates.py).
        check_template: evaluate the bare template before the first word.
        judge: ``auto`` (ShapesWorld's geometric judge for ``diffusion: shapesworld``), ``shapesworld`` or
            None. The judge never decides anything in the search; it is recorded for SSR(J).
        eval_batch_size: images per generation call when evaluating a prompt.
        kwargs: :class:`TargetSearch`'s; ``max_iterations`` is ``max_words * steps_per_word``; ``grad_mode``
            defaults to the exact gradient through every denoising step, checkpointed (METHOD.md: the words
            condition every step, the early ones set the layout; the residual shortcut is the latent search's
            device and would hide them).
    """

    def __init__(
        self,
        candidates: CandidateSource | None = None,
        max_words: int = 4,
        steps_per_word: int = 10,
        eval_seeds: int = 8,
        synonyms: dict[str, list[str]] | None = None,
        exclude_class_names: bool = True,
        multi_token: str = "drop",
        check_template: bool = True,
        judge: str | None = "auto",
        eval_batch_size: int = 8,
        **kwargs,
    ) -> None:
        if candidates is None:
            raise SageError(
                "prompt search needs a candidate-word source: set model.init_args.candidates, e.g. "
                "class_path: sage_lightning.candidates.CausalLMCandidates"
            )
        if not isinstance(candidates, CandidateSource):
            raise SageError(f"candidates is a {type(candidates).__name__}: give a sage_lightning.candidates source")
        if max_words < 1:
            raise SageError(f"max_words={max_words} (L) must be at least 1")
        if steps_per_word < 1:
            raise SageError(f"steps_per_word={steps_per_word} (K) must be at least 1")
        if not 1 <= eval_seeds <= 1000:
            raise SageError(f"eval_seeds={eval_seeds} (S) must be in 1..1000")
        if eval_batch_size < 1:
            raise SageError(f"eval_batch_size={eval_batch_size} must be at least 1")
        if judge not in (None, "auto", "shapesworld"):
            raise SageError(f"judge={judge!r}: use 'auto', 'shapesworld' or null")
        if kwargs.get("grad_mode") is None:
            kwargs["grad_mode"] = FullGradient(checkpoint=True)
        super().__init__(max_iterations=max_words * steps_per_word, **kwargs)
        self.candidates = candidates  # a plain object: never part of the module tree or the checkpoint
        self.max_words, self.steps_per_word, self.eval_seeds = max_words, steps_per_word, eval_seeds
        self.synonyms = dict(synonyms or {})
        self.exclude_class_names, self.multi_token = exclude_class_names, multi_token
        self.check_template, self.eval_batch_size = check_template, eval_batch_size
        auto = "shapesworld" if self.diffusion_source == "shapesworld" else None
        self.judge_name = auto if judge == "auto" else judge
        WordFilter(None, multi_token=multi_token)  # checks multi_token now, before anything loads
        # Filled by the search, emptied by the writer: targets finished (all ranks) and this rank's evaluations.
        self.finished: list[int] = []
        self.evaluations: list[PromptEvaluation] = []

    result_writer = "sage_lightning.callbacks.prompt_writer.PromptResultWriter"

    # ----------------------------------------------------------------------------------- set-up
    def init_parameters(self) -> None:
        """Each target's words, rounds, spent evaluations and ending (no parameters: a subclass adds its own)."""
        n = len(self.targets)
        self.words: list[list[str]] = [[] for _ in range(n)]
        self.rounds: list[list[dict]] = [[] for _ in range(n)]  # every evaluated prompt, in order
        self.spent = torch.zeros(n, dtype=torch.long)  # UNet evaluations of the prompt evaluations (forwards)
        self.reason: list[str | None] = [None] * n  # why a finished target ended
        self.last: list[dict | None] = [None] * n  # each target's latest evaluation (decisions, probs, judge)
        self.filters: dict[str, WordFilter] = {}

    def word_filter(self, class_name: str) -> WordFilter:
        if class_name not in self.filters:
            known = class_synonyms(self.frozen.ensemble.class_names)
            excluded = [class_name, *self.synonyms.get(class_name, []), *known.get(class_name, [])]
            others = [w for name, words in known.items() for w in (name, *words)] if self.exclude_class_names else []
            self.filters[class_name] = WordFilter(
                self.frozen.encoder.word_tokenizers, excluded, self.multi_token, others
            )
        return self.filters[class_name]

    # ---------------------------------------------------------------------------------- prompts
    def prompt_of(self, target: int, extra: list[str] | tuple[str, ...] = ()) -> str:
        """The natural prompt so far: template prompt + appended words (+ ``extra``)."""
        return " ".join([self.targets[target].prompt, *self.words[target], *extra])

    def proposals(self, target: int) -> tuple[list[Candidate], Tensor]:
        """Accepted candidates for the next word of ``target`` and their embeddings ``[C, D]``."""
        t = self.targets[target]
        accepted = self.word_filter(t.class_name).accept(self.candidates.propose(self.prompt_of(target)))
        encoder = self.frozen.encoder
        if not accepted:
            return [], torch.zeros(0, encoder.embed_dim)
        rows = [encoder.word_embedding(c.word) for c, _ in accepted]
        return [c for c, _ in accepted], torch.stack(rows).cpu()

    def eval_seed_list(self, target: int) -> list[int]:
        base = EVAL_SEED_BASE + self.targets[target].seed * 1000
        return [base + j for j in range(self.eval_seeds)]

    # ------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, target: int, extra: list[str] | tuple[str, ...] = ()) -> PromptEvaluation:
        """Generate the prompt so far (+ ``extra`` words) from the target's S evaluation seeds; ask D and the judge."""
        prompt = self.prompt_of(target, extra)
        shape = self.latent_shape()
        seeds = self.eval_seed_list(target)
        latents = torch.stack([seeded_latent(s, shape) for s in seeds])
        cond = self.prompt_embeddings([prompt])
        size = self.eval_batch_size
        images = torch.cat(
            [
                self.generate(chunk.to(self.device), cond, seeds[k * size : (k + 1) * size])
                for k, chunk in enumerate(latents.split(size))
            ]
        )
        cls = self.class_index[target].expand(len(images)).to(self.device)
        out = self.frozen.ensemble(images, cls)
        images = images.float().cpu()
        words = len(self.words[target]) + len(extra)
        return PromptEvaluation(
            target, prompt, words, images, out.failed.cpu(), out.probs.float().cpu(), self.judge_images(images)
        )

    def judge_images(self, images: Tensor) -> list[str | None] | None:
        if self.judge_name != "shapesworld":
            return None
        from sage_lightning.worlds import find_world

        return find_world(self.judge_name).judge(images)

    # ------------------------------------------------------------------------------------- cost
    def eval_cost(self) -> int:
        """UNet evaluations (forwards only, so also forward-equivalents) of judging one prompt on S seeds."""
        return self.eval_seeds * self.cost.image()

    def iteration_cost(self, unit: Unit = FORWARD_EQUIVALENTS) -> int:
        """Cost of one iteration beyond its prompt evaluations (those are in ``spent``): nothing here, a round's
        cost is its evaluation; :class:`~sage_lightning.searches.prompt.PromptSearch` adds its sign steps."""
        return 0

    def target_unet_evaluations(self, target: int) -> int:
        """UNet evaluations target ``target`` used: its iterations plus its prompt evaluations and re-ranks."""
        return int(self.iterations[target]) * self.iteration_cost(UNET_EVALUATIONS) + int(self.spent[target])

    def target_forward_equivalents(self, target: int) -> int:
        """Compute target ``target`` used, in forward-equivalents: its iterations plus its prompt evaluations
        and re-ranks (forwards only)."""
        return int(self.iterations[target]) * self.iteration_cost() + int(self.spent[target])

    def forward_equivalents_spent(self) -> int:
        return int(self.iterations.sum()) * self.iteration_cost() + int(self.spent.sum())

    # ----------------------------------------------------------------------------- state changes
    def conclude(self, rounds: dict[int, tuple[str | None, PromptEvaluation | None, int]]) -> None:
        """Apply this rank's finished rounds ``{target: (word, evaluation, unet_evaluations)}`` on every rank.

        ``word`` None = the template round; evaluation None = no candidate was left (the target ends).
        Collective under DDP: every rank calls it at the same point, possibly with nothing.
        """
        self.evaluations += [ev for _, ev, _ in rounds.values() if ev is not None]
        local = [
            {
                "target": t,
                "word": word,
                "cost": cost,
                "prompt": None if ev is None else ev.prompt,
                "decisions": None if ev is None else ev.decisions.tolist(),
                "probs": None if ev is None else ev.probs.tolist(),
                "judged": None if ev is None else ev.judged,
            }
            for t, (word, ev, cost) in sorted(rounds.items())
        ]
        items = _all_gather(local)
        for item in items:  # every rank holds every item: all raise the same error
            if item["probs"] is not None and not torch.isfinite(torch.tensor(item["probs"])).all():
                raise SageError(
                    f"a probability of prompt {item['prompt']!r} (target {item['target']}) is not finite at "
                    f"iteration {int(self.iterations[item['target']])}: the search diverged (lower lr or "
                    "guidance_scale); the run stops before anything non-finite is written"
                )
        for item in items:
            self.apply_round(item)

    def word_appended(self, target: int) -> None:
        """What a search does when ``target`` gets a word (:class:`PromptSearch`: fresh slots); here nothing."""

    def apply_round(self, item: dict) -> None:
        t = int(item["target"])
        self.spent[t] += int(item["cost"])
        if item["word"] is not None:
            self.words[t].append(item["word"])
            self.word_appended(t)
        if item["decisions"] is None:
            self.status[t], self.reason[t] = EXHAUSTED, "no candidates"
        else:
            self.last[t] = {k: item[k] for k in ("prompt", "decisions", "probs", "judged")}
            self.last[t]["words"] = len(self.words[t])
            entry = {"words": len(self.words[t]), "failed_seeds": sum(item["decisions"])}
            if item["word"] is None:  # the bare template's images are the clean ones (D/judge agreement)
                entry.update(decisions=list(item["decisions"]), judged=item["judged"])
            self.rounds[t].append(entry)
            if majority(item["decisions"]):
                self.status[t], self.reason[t] = FOUND, "failure" if self.words[t] else "template fails"
            elif self.exhausted(t):
                self.status[t], self.reason[t] = EXHAUSTED, "max_words"
            elif len(self.words[t]) >= self.max_words:
                self.words[t] = []  # a fresh chain from the template (random baseline)
        if self.status[t] != RUNNING:
            self.finished.append(t)

    def exhausted(self, target: int) -> bool:
        return len(self.words[target]) >= self.max_words

    def template_round(self, ids: Tensor) -> Tensor:
        """Evaluate the bare template of fresh targets of this batch; returns the rows that stay active."""
        rows = [int(i) for i in ids.clamp(min=0).tolist()]
        fresh = [t for t, i in zip(rows, ids.tolist(), strict=True) if i >= 0 and not self.rounds[t]]
        if self.check_template:
            self.conclude({t: (None, self.evaluate(t), self.eval_cost()) for t in fresh})
        return torch.tensor([i >= 0 and self.status[t] == RUNNING for t, i in zip(rows, ids.tolist(), strict=True)])

    # ------------------------------------------------------------------------------ checkpoints
    def settings(self) -> dict:
        return {"max_words": self.max_words, "steps_per_word": self.steps_per_word, "eval_seeds": self.eval_seeds}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["sage_state"]["prompt_search"] = {
            "settings": self.settings(),
            "words": [list(w) for w in self.words],
            "rounds": [list(r) for r in self.rounds],
            "spent": self.spent.clone(),
            "reason": list(self.reason),
            "last": list(self.last),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint["sage_state"].get("prompt_search")
        if state is None or state["settings"] != self.settings():
            raise SageError(
                "the checkpoint was made by another search or other prompt-search settings (max_words, "
                "steps_per_word, eval_seeds): resume with the run's config.yaml"
            )
        self.words = [list(w) for w in state["words"]]
        self.rounds = [list(r) for r in state["rounds"]]
        self.spent.copy_(state["spent"])
        self.reason, self.last = list(state["reason"]), list(state["last"])


def _all_gather(items: list[dict]) -> list[dict]:
    return sorted(all_gather_objects(items), key=lambda i: i["target"])
