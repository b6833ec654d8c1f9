"""Prompt sets of the universal-token search: training prompts and a held-out set the optimisation never sees.

Training prompts are (class, template, seed) triples exactly as :class:`ClassPromptDataModule` makes them,
served as batches of ids (an epoch = one pass over all training prompts). The held-out set is built the
same way from its own templates, classes and seeds; a held-out (prompt, seed) pair that also occurs in
training is refused, so a hit rate measured on it is never a training number.
"""

from __future__ import annotations

from sage_lightning.datamodules.class_prompts import ClassPromptDataModule, class_targets
from sage_lightning.errors import SageError
from sage_lightning.targets import Target

HELD_OUT_BASE_SEED = 1_000_000


class PromptSetDataModule(ClassPromptDataModule):
    """Training prompts (``classes`` x ``templates`` x ``seeds_per_class``) and a held-out prompt set.

    Args:
        held_out_templates: templates of the held-out prompts (default: two that training does not use).
        held_out_classes: classes of the held-out prompts (default: the training classes).
        held_out_seeds_per_class: seeds per held-out (class, template), from ``held_out_base_seed``.
        **kwargs: the training prompts: ``classes``, ``templates``, ``seeds_per_class``, ``base_seed``,
            ``batch_size`` (as :class:`ClassPromptDataModule`).

    Example::

        data = PromptSetDataModule(classes="all", templates=["a photo of a {}"], seeds_per_class=2,
                                   held_out_templates=["a drawing of a {}"], held_out_seeds_per_class=2)
    """

    def __init__(
        self,
        held_out_templates: list[str] | None = None,
        held_out_classes: list[str | int] | str | None = None,
        held_out_seeds_per_class: int = 1,
        held_out_base_seed: int = HELD_OUT_BASE_SEED,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.held_out_templates = held_out_templates or ["a picture of a {}", "an image showing a {}"]
        for template in self.held_out_templates:
            if template.count("{}") != 1:
                raise SageError(
                    f"held-out template {template!r} must contain exactly one '{{}}' for the class name"
                )
        if held_out_seeds_per_class < 1:
            raise SageError(f"held_out_seeds_per_class={held_out_seeds_per_class} must be at least 1")
        self.held_out_classes = held_out_classes
        self.held_out_seeds_per_class, self.held_out_base_seed = held_out_seeds_per_class, held_out_base_seed

    def held_out(self, known: list[str]) -> list[Target]:
        """The held-out prompts, in a fixed order (class, template, seed); disjoint from training."""
        source = self if self.held_out_classes is None else ClassPromptDataModule(self.held_out_classes)
        held_out = class_targets(known, source.class_indices(known), self.held_out_templates,
                                 self.held_out_seeds_per_class, self.held_out_base_seed)
        training = {(t.prompt, t.seed) for t in self.targets(known)}
        shared = [t for t in held_out if (t.prompt, t.seed) in training]
        if shared:
            raise SageError(
                f"held-out prompt {shared[0].prompt!r} with seed {shared[0].seed} is also a training prompt: "
                "use other held_out_templates or a held_out_base_seed outside the training seeds"
            )
        return held_out
