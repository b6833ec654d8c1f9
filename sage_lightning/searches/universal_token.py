"""Universal adversarial token (METHOD.md, "Universal adversarial token").

One free token embedding ``e`` ``[D]`` is appended to every training prompt through the slot ``[*]`` (the
prompt encoder's slot hook: no transformers class is patched). Sign-gradient steps minimise, over batches
of (prompt p, seed s) of many classes,

    mean_m (1 - 2 p_m(t))  +  lambda * (1 - cos(text(p + e), text(p)))

so that the images turn into the target class t while the prompt's pooled text feature moves little
(``loss: log`` or ``margin`` replace the first term by one that does not saturate at p_t near 0; steps, box
and start are in the text encoder's own units: :class:`~sage_lightning.searches.embedding_search.EmbeddingSearch`).
The held-out prompts (``PromptSetDataModule.held_out``) are never used by the optimisation; they are
rendered with and without the token for the CLIP score and the hit rate (``sage_lightning.callbacks.ClipScoreLogger``,
``sage_lightning.callbacks.TokenWriter``).

Targets, state and resume are those of :class:`TargetSearch`: a target is a training prompt, an epoch is
one pass over them, a prompt is *exhausted* after ``max_iterations`` passes. Under DDP the ranks take
disjoint prompts of a global batch and DDP averages the token's gradient, so a step's sign is that of
the whole global batch.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sage_lightning.errors import SageError
from sage_lightning.sampler import FullGradient
from sage_lightning.searches.base import (
    EMBEDDING_BOX,
    EXHAUSTED,
    clamp_constraint,
    raise_on_every_rank,
    target_class_indices,
)
from sage_lightning.searches.embedding_search import EmbeddingSearch, resolve_init
from sage_lightning.targets import Target, seeded_latent
from sage_lightning.text import slot

SLOT = slot("*")  # shown as [*]
PLACEMENTS = ("end", "before_class")


@dataclass
class HeldOutEvaluation:
    """This rank's share of the held-out prompts, rendered once (with or without the token)."""

    targets: list[Target]
    images: Tensor  # [n, 3, H, W] uint8 on the CPU (what is saved, judged and CLIP-scored)
    probs: Tensor  # [M, n] each member's probability of the target class
    top1: Tensor  # [M, n] each member's top-1 class index
    hit: Tensor  # [n] bool: every member's top-1 is the target class
    failed: Tensor  # [n] bool: D declares a failure for each prompt's own class


class UniversalTokenSearch(EmbeddingSearch):
    """Trainable parameter: ``token`` ``[D]``, one input embedding of the text encoder.

    Args:
        target: the class the token should make the model draw (name or index of the ensemble's classes).
        text_weight: lambda of the text-similarity term.
        init: how ``e`` starts (:class:`EmbeddingSearch`; default ``mean_noise``: the table's mean row plus
            noise of each dimension's std, drawn from ``init_seed``; ``word`` when ``init_word`` is given).
        init_word: a one-token word whose embedding starts ``e`` (``init: word``).
        placeholder: the token's name for export into a tokenizer (default ``<sage-TARGET>``).
        placement: where the slot sits in each prompt: ``end`` (appended, the paper's) or ``before_class``
            (right before the prompt's class word, e.g. "a drawing of a [*] circle": a causal text encoder lets
            a word change the class word's own state only from before it; benchmarks/word_position.py).
        include_target_class: keep prompts of the target class itself (default: dropped, they hit trivially).
        eval_batch_size: prompts per generation call when the held-out set is rendered.
        **kwargs: :class:`EmbeddingSearch` (step_units, box, loss, init_seed) and :class:`TargetSearch`
            (diffusion, ensemble, num_steps, guidance_scale, scheduler, grad_mode, ``max_iterations`` = passes
            over the training prompts, ``lr``, dtype, ...). ``grad_mode`` defaults to the exact gradient through
            every denoising step, checkpointed (METHOD.md: the token conditions every step; the residual
            shortcut is the latent search's device), as for :class:`PromptSearch`.

    Example (the same as ``sage fit --config configs/universal_token.yaml``)::

        search = UniversalTokenSearch(target="star", diffusion="shapesworld", max_iterations=4)
        trainer.fit(search, datamodule=PromptSetDataModule(classes="all", seeds_per_class=2))
    """


    def __init__(
        self,
        target: str | int = "star",
        text_weight: float = 0.1,
        init: str | None = None,
        init_word: str | None = None,
        placeholder: str | None = None,
        placement: str = "end",
        include_target_class: bool = False,
        eval_batch_size: int = 8,
        **kwargs,
    ) -> None:
        if kwargs.get("grad_mode") is None:
            kwargs["grad_mode"] = FullGradient(checkpoint=True)
        super().__init__(init=resolve_init(init, init_word, "mean_noise"), **kwargs)
        if text_weight < 0:
            raise SageError(f"text_weight={text_weight} must be >= 0")
        if eval_batch_size < 1:
            raise SageError(f"eval_batch_size={eval_batch_size} must be at least 1")
        if placement not in PLACEMENTS:
            raise SageError(f"placement={placement!r} is not one of {', '.join(PLACEMENTS)}")
        self.placement = placement
        self.target, self.text_weight, self.init_word = target, text_weight, init_word
        self.include_target_class, self.eval_batch_size = include_target_class, eval_batch_size
        self._placeholder = placeholder
        self.held_out: list[Target] = []
        self._evaluations: dict[bool, tuple[Tensor, HeldOutEvaluation]] = {}

    # ----------------------------------------------------------------------------------- set-up
    def prepare(self, targets_of, held_out_of=None) -> None:
        """Load the models; training prompts from ``targets_of``, held-out ones from ``held_out_of``."""
        if self._frozen is not None:
            return
        super().prepare(lambda known: self._drop_target_class(targets_of(known), known))
        known = self.frozen.ensemble.class_names
        self.held_out = self._drop_target_class(held_out_of(known), known) if held_out_of else []

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "held_out"):
            raise SageError(
                "the universal-token search needs training and held-out prompts: use data: "
                "sage_lightning.datamodules.PromptSetDataModule"
            )
        self.prepare(datamodule.targets, datamodule.held_out)

    result_writer = "sage_lightning.callbacks.token_writer.TokenWriter"

    def _drop_target_class(self, targets: list[Target], known: list[str]) -> list[Target]:
        (index,) = self._resolve_target(known)
        self.target_name = known[index]
        classes = target_class_indices(targets, known)
        kept = [t for t, c in zip(targets, classes, strict=True) if self.include_target_class or c != index]
        if targets and not kept:
            raise SageError(
                f"every prompt is of the target class {self.target_name!r}: add other classes to data.classes"
            )
        return [dataclasses.replace(t, index=i) for i, t in enumerate(kept)]

    def _resolve_target(self, known: list[str]) -> list[int]:
        from sage_lightning.surrogate import resolve_classes

        try:
            return resolve_classes([self.target], known)
        except SageError as err:  # e.g. ShapesWorld's "star" under an ImageNet ensemble
            raise SageError(
                f"target {self.target!r} is not a class of D ({len(known)} classes; {err}): set "
                "model.init_args.target to a class of this model's ensemble"
            ) from err

    def init_parameters(self) -> None:
        self.token = nn.Parameter(self.draw_start(self.init_seed, self.init_word, [self.target_name]))
        self.target_index = torch.tensor(self._resolve_target(self.frozen.ensemble.class_names))
        if self.max_iterations == 0:  # evaluation only: nothing to optimise
            self.status.fill_(EXHAUSTED)

    @property
    def placeholder(self) -> str:
        """The token's name when it is added to a tokenizer (``token.safetensors`` metadata)."""
        name = str(getattr(self, "target_name", self.target)).replace(" ", "-")
        return self._placeholder or f"<sage-{name}>"

    def constraints(self) -> list[tuple[str, dict]]:
        """The token's entries in [-2.5, 2.5], the prompt slots' range (METHOD.md)."""
        return [clamp_constraint(EMBEDDING_BOX)]

    def adversarial_rows(self) -> Tensor:
        """The token as one row, for ``sage_lightning.callbacks.ClampPerturbation`` (``stepped_targets`` is ``[0]``)."""
        return self.token.view(1, -1)

    # ------------------------------------------------------------------------------- generation
    def with_slot(self, target: Target) -> str:
        """The target's prompt with the slot ``[*]`` where ``placement`` puts it."""
        if self.placement == "end":
            return f"{target.prompt} {SLOT}"
        words = list(re.finditer(rf"(?<!\w){re.escape(target.class_name)}(?!\w)", target.prompt))
        if not words:  # the class name as a whole word, not inside another ("star" in "starry")
            raise SageError(f"placement=before_class needs the class word in every prompt; {target.prompt!r} has no "
                            f"{target.class_name!r}: use templates with {{}} or placement: end")
        at = words[-1].start()
        return f"{target.prompt[:at]}{SLOT} {target.prompt[at:]}"

    def latents_of(self, targets: list[Target]) -> Tensor:
        shape = self.latent_shape()
        return torch.stack([seeded_latent(t.seed, shape) for t in targets]).to(self.device)

    def encode(self, targets: list[Target], with_token: bool) -> Tensor:
        """Prompt embeddings ``[B, L, D]`` of the targets' prompts, the token in its slot when ``with_token``."""
        if not with_token:
            return self.prompt_embeddings([t.prompt for t in targets])
        return self.frozen.encoder([self.with_slot(t) for t in targets], {"*": self.token})

    def render(self, targets: list[Target], with_token: bool) -> Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] of the targets' prompts and seeds."""
        cond = self.encode(targets, with_token)
        return self.generate(self.latents_of(targets), cond, [t.seed for t in targets])

    def text_similarity(self, targets: list[Target]) -> Tensor:
        """``cos(text(p + e), text(p))`` per prompt (pooled EOS features), differentiable in the token."""
        encoder = self.frozen.encoder
        with torch.no_grad():
            plain = encoder.pooled([t.prompt for t in targets])
        slotted = encoder.pooled([self.with_slot(t) for t in targets], {"*": self.token})
        return F.cosine_similarity(slotted.float(), plain.float(), dim=-1)

    # --------------------------------------------------------------------------------- training
    def training_step(self, ids: Tensor, batch_idx: int) -> Tensor:
        real = ids >= 0
        targets = [self.targets[int(i)] for i in ids.clamp(min=0)]
        images = self.render(targets, with_token=True)
        output = self.surrogate(images, self.target_index.expand(len(targets)).to(self.device), towards=True)
        similarity = self.text_similarity(targets)
        per_sample = output.per_sample_loss + self.text_weight * (1 - similarity)
        self.stop_if_not_finite(
            ids, {"token": self.token.expand(len(ids), -1), "loss": per_sample,
                  "probability": output.probs.transpose(0, 1)},
        )
        self.count_step(ids)
        weights = real.to(per_sample.dtype)
        n = max(int(real.sum()), 1)
        self.log("loss", (per_sample * weights).sum() / n, prog_bar=True, batch_size=n)
        self.log("p_target", (output.probs.mean(0) * weights).sum() / n, prog_bar=True, batch_size=n)
        self.log("text_cos", (similarity.detach() * weights).sum() / n, batch_size=n)
        return (per_sample * weights).sum()

    def count_step(self, ids: Tensor) -> None:
        """Count one pass-step for every real prompt of the global batch (all ranks agree)."""
        self.count_steps(ids[ids >= 0])
        self.status[self.iterations >= self.max_iterations] = EXHAUSTED
        self.stepped_targets = torch.zeros(1, dtype=torch.long)  # the token's one row is stepped

    # ------------------------------------------------------------------------------- evaluation
    def rank_share(self, targets: list[Target]) -> list[Target]:
        if self._trainer is None:
            return list(targets)
        return targets[self.trainer.global_rank :: self.trainer.world_size]

    @torch.no_grad()
    def held_out_evaluation(self, with_token: bool) -> HeldOutEvaluation:
        """This rank's held-out prompts rendered with the current token (or without it); cached until the
        token changes, so the CLIP-score logger and the writer share one rendering."""
        key = self.token.detach().cpu().clone() if with_token else torch.zeros(0)
        cached = self._evaluations.get(with_token)
        if cached is not None and torch.equal(cached[0], key):
            return cached[1]
        from sage_lightning.results import to_uint8

        mine = self.rank_share(self.held_out)
        images, probs, top1, failed = [], [], [], []
        ensemble = self.frozen.ensemble
        for start in range(0, len(mine), self.eval_batch_size):
            chunk = mine[start : start + self.eval_batch_size]
            batch = self.render(chunk, with_token)
            member_probs = ensemble.member_probs(batch)  # [M, b, C]
            probs.append(member_probs[..., int(self.target_index)].cpu())
            top1.append(member_probs.argmax(-1).cpu())
            own = torch.tensor(target_class_indices(chunk, ensemble.class_names))
            failed.append(ensemble.from_probs(member_probs, own).failed.cpu())
            images += [torch.from_numpy(to_uint8(image)).permute(2, 0, 1) for image in batch]
        members = len(self.frozen.ensemble.members)
        top1 = torch.cat(top1, 1) if top1 else torch.zeros(members, 0, dtype=torch.long)
        evaluation = HeldOutEvaluation(
            targets=mine,
            images=torch.stack(images) if images else torch.zeros(0, 3, 1, 1, dtype=torch.uint8),
            probs=torch.cat(probs, 1) if probs else torch.zeros(members, 0),
            top1=top1,
            hit=(top1 == int(self.target_index)).all(0),
            failed=torch.cat(failed) if failed else torch.zeros(0, dtype=torch.bool),
        )
        self.stop_if_held_out_not_finite(evaluation, with_token)
        self._evaluations[with_token] = (key, evaluation)
        return evaluation

    def stop_if_held_out_not_finite(self, evaluation: HeldOutEvaluation, with_token: bool) -> None:
        """Stop the run, on every rank with the same line (collective: every rank renders its share of the held-out
        prompts at the same moments), when the token or a held-out probability is NaN or infinite, before the
        CLIP score or the writer uses it."""
        problem = ""
        token = self.token.detach().reshape(-1)
        if with_token and not bool(torch.isfinite(token).all()):
            value = token[~torch.isfinite(token)][0].item()
            problem = f"the token holds {value} after {int(self.iterations.max())} passes"
        bad = ~torch.isfinite(evaluation.probs).all(0)
        if not problem and bool(bad.any()):
            k = int(torch.nonzero(bad)[0])
            value = evaluation.probs[:, k][~torch.isfinite(evaluation.probs[:, k])][0].item()
            t = evaluation.targets[k]
            problem = (f"the probability of held-out prompt {t.index} ({t.prompt!r}, seed {t.seed}) "
                       f"{'with' if with_token else 'without'} the token is {value}")
        raise_on_every_rank(problem)

    # ------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["sage_state"]["universal_token"] = {"target": self.target_name}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint["sage_state"].get("universal_token", {}).get("target")
        if saved != self.target_name:
            raise SageError(
                f"the checkpoint trains a token towards {saved!r}, this config towards {self.target_name!r}: "
                "resume with the run's config.yaml"
            )
