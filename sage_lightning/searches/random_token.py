"""The chance level of the universal token (METHOD.md, "Universal adversarial token"; issue 14).

A trained universal token ``e`` ``[D]`` makes the model draw the target class t for many prompts. Is that
the optimisation, or would any appended embedding that large do it? This baseline appends a *random*
token ``r`` of the same norm, in the same box as the trained token (the run's ``ClampPerturbation``, the search's
[-2.5, 2.5] by default): ``r = clamp(s g)`` with ``g ~ N(0, I_D)`` from its own seeded generator (a uniformly
random direction) and the scale ``s`` that gives ``|r| = |e|`` (``g * |e| / |g|`` itself when no entry meets the
box; like with like: a token of that norm drawn outside the box is one the trained token could never be), to the
same held-out prompts with the same seeds, and reports the same hit rate against t (D, and ShapesWorld's judge)
and CLIP score, through the same writer. Nothing is optimised: the run only renders and judges.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from sage_lightning.constraints import run_box, sphere_in_box
from sage_lightning.errors import SageError
from sage_lightning.searches.base import EMBEDDING_BOX
from sage_lightning.searches.universal_token import UniversalTokenSearch

TOKEN_FILE = "token.safetensors"


def reference_token(path: str | Path) -> tuple[torch.Tensor, dict[str, str]]:
    """The ``embedding`` ``[D]`` and metadata of a universal-token run's ``token.safetensors`` (or its folder)."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    path = path / TOKEN_FILE if path.is_dir() else path
    if not path.is_file():
        raise SageError(
            f"reference token {str(path)!r} does not exist: give a universal-token run's token.safetensors "
            "(sage fit --config configs/universal_token.yaml writes RUN/token.safetensors)"
        )
    with safe_open(str(path), "pt") as f:
        if "embedding" not in f.keys():
            raise SageError(f"{str(path)!r} holds no 'embedding': it is not a universal-token run's token")
        return f.get_tensor("embedding").float(), f.metadata() or {}


class RandomTokenSearch(UniversalTokenSearch):
    """Parameter: ``token`` ``[D]``, a random direction at the reference token's norm, in its box; never trained.

    Args:
        reference: a universal-token run's ``token.safetensors`` (or its run folder); its norm is matched
            and its target must be this run's ``target``.
        norm: the norm to match instead of a reference file.
        draw_seed: seed of the random direction (one token per run; draw several for a spread).
        **kwargs: :class:`UniversalTokenSearch` (target, diffusion, num_steps, ...); ``max_iterations``
            is ignored (always 0: evaluation only).

    Example (the same prompts and seeds as the trained token's run)::

        sage fit --config configs/universal_token.yaml --config configs/random_token.yaml \\
                 --model.init_args.reference runs/universal_token/token.safetensors
    """

    def __init__(self, reference: str | None = None, norm: float | None = None, draw_seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)  # plain **kwargs: jsonargparse follows it to the parents' arguments
        self.max_iterations = 0  # evaluation only, whatever the config says
        if (reference is None) == (norm is None):
            raise SageError(
                "RandomTokenSearch matches one norm: give reference (a token.safetensors) or norm, not both"
            )
        if norm is not None and not norm > 0:
            raise SageError(f"norm={norm} must be > 0")
        self.reference, self.norm, self.draw_seed = reference, norm, draw_seed

    def target_norm(self) -> float:
        """The norm to match: ``norm``, or the reference token's (checked against this run's target and D)."""
        if self.reference is None:
            return float(self.norm)
        embedding, meta = reference_token(self.reference)
        if meta.get("target", self.target_name) != self.target_name:
            raise SageError(
                f"the reference token was trained towards {meta['target']!r}, this run's target is "
                f"{self.target_name!r}: give the same --model.init_args.target"
            )
        if embedding.numel() != self.frozen.encoder.embed_dim:
            raise SageError(
                f"the reference token has {embedding.numel()} dimensions, this text encoder "
                f"{self.frozen.encoder.embed_dim}: it belongs to another model"
            )
        return float(embedding.norm())

    def token_box(self) -> tuple[float, float]:
        """The box the trained token was clamped to: the run's clamp, else the search's own (:meth:`constraints`)."""
        box = run_box(self.trainer) if self._trainer is not None else None
        return box if box is not None else EMBEDDING_BOX

    def init_parameters(self) -> None:
        super().init_parameters()  # max_iterations = 0: every prompt starts exhausted, nothing is optimised
        dim = self.frozen.encoder.embed_dim
        g = torch.randn(dim, generator=torch.Generator().manual_seed(self.draw_seed))
        (low, high), norm = self.token_box(), self.target_norm()
        reach = math.sqrt(dim) * max(-low, high)
        if not (low < 0 < high and norm <= reach):
            raise SageError(
                f"a token of norm {norm:g} does not fit the clamp box [{low:g}, {high:g}] (at most {reach:g} in "
                f"{dim} dimensions): give the box the reference token was trained in"
            )
        inside = g * (min(-low, high) / float(g.abs().max()))  # g's direction, every entry in the box
        self.token = nn.Parameter(sphere_in_box(torch.zeros(1, dim), inside.view(1, -1), low, high, norm)[0])
