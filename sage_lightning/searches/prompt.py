"""Prompt-space SAGE (SAGE_METHOD.md, "Prompt-space search"): natural prompts the model fails to draw.

For each target (class c, template prompt p, seed s) the prompt grows one word at a time, up to L words:

1. ``p + words + " [x] [y]"`` (:meth:`PromptSearch.slotted_prompt`; slots are written with ``text.slot``, so
   no word of a prompt is ever taken for one): the adversarial slot [x] and the look-ahead slot [y] take free
   embeddings ``e_x, e_y`` (the module's only trainable parameter, ``slots [N, 2, D]``), drawn from the
   token table (``init``; :class:`~sage_lightning.searches.embedding_search.EmbeddingSearch`). K sign-gradient
   steps in the table's units, kept in the table's box, minimise D's loss (``mean_m (2 p_m(c) - 1)``, or a
   non-saturating ``loss``); step i of a target generates from the latent of seed ``s + i * STEP_SEED_STRIDE``.
2. After K steps :class:`callbacks.TokenSnapping` asks the candidate source for whole next words of
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

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sage_lightning.candidates import Candidate, CandidateSource, WordFilter
from sage_lightning.errors import SageError
from sage_lightning.sampler import FullGradient
from sage_lightning.searches.base import (
    EMBEDDING_BOX,
    EXHAUSTED,
    FOUND,
    RUNNING,
    TargetSearch,
    all_gather_objects,
    clamp_constraint,
)
from sage_lightning.searches.embedding_search import EmbeddingSearch, resolve_init
from sage_lightning.surrogate.classnames import class_synonyms
from sage_lightning.targets import seeded_latent
from sage_lightning.text import slot

STEP_SEED_STRIDE = 1_000_003
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


class PromptSearch(EmbeddingSearch):
    """SAGE's prompt search; trainable parameter ``slots [N_targets, 2, D]`` (e_x, e_y per target).

    Args:
        candidates: the candidate-word source (:mod:`sage_lightning.candidates`). Required.
        max_words: L, words appended at most per target.
        steps_per_word: K, sign-gradient steps on the slots before each snap.
        eval_seeds: S, fresh seeds a prompt is judged on (strict majority decides).
        init: how e_x, e_y start, and restart after each snap (:class:`EmbeddingSearch`; default
            ``random_row``: a fresh row of the token table per target and word, never a class name or synonym;
            ``word`` when ``init_word`` is given).
        init_word: with ``init: word``, the slots start (and restart) at this word's token embedding.
        synonyms: ``{class: [words]}`` never proposed for that class (the class name never is, nor, for
            ImageNet, any WordNet lemma of its synset: :func:`~sage_lightning.surrogate.classnames.class_synonyms`).
        exclude_class_names: also never propose any other class name of D or its synonyms (a prompt that
            names another class is not a failure of the model).
        multi_token: ``drop`` (candidates must be one CLIP token) or ``mean`` (see candidates.py).
        check_template: evaluate the bare template before the first word.
        judge: ``auto`` (ShapesWorld's geometric judge for ``diffusion: shapesworld``), ``shapesworld`` or
            None. The judge never decides anything in the search; it is recorded for SSR(J).
        eval_batch_size: images per generation call when evaluating a prompt.
        kwargs: :class:`EmbeddingSearch`'s (step_units, box, loss, init_seed) and :class:`TargetSearch`'s
            (diffusion, ensemble, num_steps, guidance_scale, scheduler, grad_mode, lr, dtype, local_files_only);
            ``max_iterations`` is ``max_words * steps_per_word``. ``grad_mode`` defaults to the exact gradient
            through every denoising step, checkpointed
            (SAGE_METHOD.md: the words condition every step, the early ones set the layout; the residual
            shortcut is the latent search's device and would hide them).

    Example (the same as ``sage fit --config configs/prompt_search.yaml``)::

        search = PromptSearch(candidates=CausalLMCandidates("shapesworld"), max_words=4, steps_per_word=10)
        trainer = L.Trainer(max_epochs=41, callbacks=[ClampPerturbation(-2.5, 2.5), TokenSnapping()])
        trainer.fit(search, datamodule=ClassPromptDataModule(classes="all"))
    """

    def __init__(
        self,
        candidates: CandidateSource | None = None,
        max_words: int = 4,
        steps_per_word: int = 10,
        eval_seeds: int = 8,
        init: str | None = None,
        init_word: str | None = None,
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
        init = resolve_init(init, init_word, "random_row")
        super().__init__(max_iterations=max_words * steps_per_word, init=init, **kwargs)
        self.candidates = candidates  # a plain object: never part of the module tree or the checkpoint
        self.max_words, self.steps_per_word, self.eval_seeds = max_words, steps_per_word, eval_seeds
        self.init_word, self.synonyms = init_word, dict(synonyms or {})
        self.exclude_class_names, self.multi_token = exclude_class_names, multi_token
        self.check_template, self.eval_batch_size = check_template, eval_batch_size
        auto = "shapesworld" if self.diffusion_source == "shapesworld" else None
        self.judge_name = auto if judge == "auto" else judge
        WordFilter(None, multi_token=multi_token)  # checks multi_token now, before anything loads
        # Filled by the search, emptied by the writer: targets finished (all ranks) and this rank's evaluations.
        self.finished: list[int] = []
        self.evaluations: list[PromptEvaluation] = []

    # ----------------------------------------------------------------------------------- set-up
    def init_parameters(self) -> None:
        n = len(self.targets)
        self.words: list[list[str]] = [[] for _ in range(n)]
        self.rounds: list[list[dict]] = [[] for _ in range(n)]  # every evaluated prompt, in order
        self.spent = torch.zeros(n, dtype=torch.long)  # UNet evaluations outside the sign steps
        self.reason: list[str | None] = [None] * n  # why a finished target ended
        self.last: list[dict | None] = [None] * n  # each target's latest evaluation (decisions, probs, judge)
        if self.init == "word" and self.init_word:
            ids = self.frozen.encoder.word_ids(self.init_word)
            if len(ids) != 1:
                raise SageError(
                    f"init_word={self.init_word!r} is {len(ids)} CLIP tokens: give a word that is one token"
                )
        self.slots = nn.Parameter(torch.stack([self.slot_starts(t) for t in range(n)]))
        self.filters: dict[str, WordFilter] = {}

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

    def adversarial_rows(self) -> nn.Parameter:
        """The parameter whose rows (one per target: ``[2, D]`` = e_x, e_y) the clamp callback acts on."""
        return self.slots

    def word_filter(self, class_name: str) -> WordFilter:
        if class_name not in self.filters:
            known = class_synonyms(self.frozen.ensemble.class_names)
            excluded = [class_name, *self.synonyms.get(class_name, []), *known.get(class_name, [])]
            others = [w for name, words in known.items() for w in (name, *words)] if self.exclude_class_names else []
            self.filters[class_name] = WordFilter(self.frozen.model.tokenizer, excluded, self.multi_token, others)
        return self.filters[class_name]

    result_writer = "callbacks.prompt_writer.PromptResultWriter"

    def method_callbacks(self) -> list[str]:
        """Token snapping is part of the method (added when the config has none; not for the baselines)."""
        return ["callbacks.token_snapping.TokenSnapping"] if self.automatic_optimization else []

    def constraints(self) -> list[tuple[str, dict]]:
        """e_x, e_y in [-2.5, 2.5] (SAGE_METHOD.md; none for the baselines, which have no slots to step)."""
        return [clamp_constraint(EMBEDDING_BOX)] if self.automatic_optimization else []

    # ---------------------------------------------------------------------------------- prompts
    def prompt_of(self, target: int, extra: list[str] | tuple[str, ...] = ()) -> str:
        """The natural prompt so far: template prompt + snapped words (+ ``extra``)."""
        return " ".join([self.targets[target].prompt, *self.words[target], *extra])

    def slotted_prompt(self, target: int) -> str:
        """The prompt so far followed by the adversarial slot [x] and the look-ahead slot [y]."""
        return f"{self.prompt_of(target)} {slot('x')} {slot('y')}"

    def proposals(self, target: int) -> tuple[list[Candidate], Tensor]:
        """Accepted candidates for the next word of ``target`` and their embeddings ``[C, D]``."""
        t = self.targets[target]
        accepted = self.word_filter(t.class_name).accept(self.candidates.propose(self.prompt_of(target)))
        encoder = self.frozen.encoder
        if not accepted:
            return [], torch.zeros(0, encoder.embed_dim)
        rows = [encoder.embedding_rows(ids).float().mean(0) for _, ids in accepted]
        return [c for c, _ in accepted], torch.stack(rows).cpu()

    def step_seeds(self, targets: list[int], offset: int = 0) -> list[int]:
        """Seed of each target's current sign step (``offset=-1``: its last step): its latent and its noise."""
        return [self.targets[t].seed + STEP_SEED_STRIDE * int(self.iterations[t] + offset) for t in targets]

    def step_latents(self, targets: list[int], offset: int = 0) -> Tensor:
        """Latent of each target's current sign step (``offset=-1``: its last step)."""
        shape = self.latent_shape()
        return torch.stack([seeded_latent(s, shape) for s in self.step_seeds(targets, offset)]).to(self.device)

    def eval_seed_list(self, target: int) -> list[int]:
        base = EVAL_SEED_BASE + self.targets[target].seed * 1000
        return [base + j for j in range(self.eval_seeds)]

    def latent_shape(self) -> tuple[int, int, int]:
        unet = self.frozen.model.unet
        return (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)

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
        from sage_lightning.shapesworld.judge import judge_shapes, to_uint8

        return judge_shapes(to_uint8(images))

    @torch.no_grad()
    def real_loss(self, target: int, words: list[str]) -> Tensor:
        """D's loss of ``prompt + word`` for each word, on the latent of the target's last step ``[len(words)]``."""
        z = self.step_latents([target], offset=-1).expand(len(words), -1, -1, -1)
        cond = self.prompt_embeddings([self.prompt_of(target, [w]) for w in words])
        images = self.generate(z, cond, self.step_seeds([target], offset=-1) * len(words))
        cls = self.class_index[target].expand(len(words)).to(self.device)
        return self.frozen.ensemble(images, cls).per_sample_loss.float().cpu()

    def sample_cost(self) -> int:
        """UNet evaluations of one generated image (conditional and unconditional counted apart)."""
        return self.loop_length * (2 if self.guidance_scale > 1.0 else 1)

    def step_cost(self) -> int:
        """UNet evaluations of one sign step: a forward, and a backward through each graphed step (as
        :meth:`TargetSearch.unet_evaluations` counts them; needs no model weights, so configs can match budgets)."""
        graphed = self.grad_mode.graphed_steps(self.loop_length)
        backward = graphed * (2 if self.guidance_scale > 1.0 else 1) * (2 if self.grad_mode.checkpoint else 1)
        return self.sample_cost() + backward

    def unet_evaluations(self, target: int) -> int:
        """UNet evaluations target ``target`` used: its sign steps plus its prompt evaluations and re-ranks."""
        return int(self.iterations[target]) * self.step_cost() + int(self.spent[target])

    def step_forward_equivalents(self) -> int:
        """Compute of one sign step in forward-equivalents (SAGE_METHOD.md's unit, as
        :meth:`TargetSearch.forward_equivalents`): a sampling call, and a backward through each graphed step
        at two forwards (three with checkpointing). Needs no model weights, so a baseline can match it."""
        return TargetSearch.forward_equivalents(self, 1) - TargetSearch.forward_equivalents(self, 0)

    def target_forward_equivalents(self, target: int) -> int:
        """Compute target ``target`` used, in forward-equivalents: its sign steps plus its prompt evaluations
        and re-ranks (forwards only)."""
        return int(self.iterations[target]) * self.step_forward_equivalents() + int(self.spent[target])

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

    def apply_round(self, item: dict) -> None:
        t = int(item["target"])
        self.spent[t] += int(item["cost"])
        if item["word"] is not None:
            self.words[t].append(item["word"])
            self.reset_slots(t)
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

    def snap_due(self, ids: Tensor) -> list[int]:
        """This rank's running targets whose current word has had its K sign steps."""
        rows = [int(i) for i in ids.tolist() if i >= 0]
        return [
            t
            for t in rows
            if self.status[t] == RUNNING
            and int(self.iterations[t]) >= self.steps_per_word * (len(self.words[t]) + 1)
        ]

    def template_round(self, ids: Tensor) -> Tensor:
        """Evaluate the bare template of fresh targets of this batch; returns the rows that stay active."""
        rows = [int(i) for i in ids.clamp(min=0).tolist()]
        fresh = [t for t, i in zip(rows, ids.tolist(), strict=True) if i >= 0 and not self.rounds[t]]
        if self.check_template:
            cost = self.eval_seeds * self.sample_cost()
            self.conclude({t: (None, self.evaluate(t), cost) for t in fresh})
        return torch.tensor([i >= 0 and self.status[t] == RUNNING for t, i in zip(rows, ids.tolist(), strict=True)])

    # ------------------------------------------------------------------------------------ steps
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
        self.count_steps(rows, active)
        self.log("loss", output.loss, prog_bar=True, batch_size=len(ids))
        self.log("targets_done", float((self.status != RUNNING).sum()), prog_bar=True, batch_size=len(ids))
        self.log("failures", float((self.status == FOUND).sum()), prog_bar=True, batch_size=len(ids))
        return self.step_loss(output.per_sample_loss, active.to(output.per_sample_loss.device))

    def count_steps(self, rows: Tensor, active: Tensor) -> None:
        """One more sign step for the active rows (summed over ranks); sets ``stepped_targets`` for the clamp."""
        stepped = torch.zeros_like(self.iterations)
        stepped[rows.cpu()[active]] = 1
        stepped = self._all_ranks_sum(stepped)
        self.iterations += stepped
        self.stepped_targets = torch.nonzero(stepped).flatten()

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


def majority(decisions: list[bool]) -> bool:
    """A strict majority of the seeds fails (SAGE_METHOD.md: the failure belongs to the prompt)."""
    return sum(bool(d) for d in decisions) * 2 > len(decisions)
