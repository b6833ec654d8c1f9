"""The discriminator D: an ensemble of frozen classifiers and SAGE's surrogate loss."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sage_lightning.embedding import check_choice
from sage_lightning.errors import SageError
from sage_lightning.surrogate.classnames import resolve_classes
from sage_lightning.surrogate.members import EnsembleMember, _check_images
from sage_lightning.surrogate.views import check_views, stack_views


@dataclass
class EnsembleOutput:
    """What the discriminator D says about a batch.

    Attributes:
        loss: scalar, mean of ``per_sample_loss`` over the batch.
        per_sample_loss: :math:`(B,)` surrogate loss, ``mean_m (2 p_m(c) - 1)`` (or, towards a
            target t, ``mean_m (1 - 2 p_m(t))``).
        probs: :math:`(M, B)` each member's softmax probability of the class.
        topk: :math:`(M, B, k)` each member's top-k output indices (into ``output_names``: a reject output is
            an index past the classes).
        failed: :math:`(B,)` bool, every member has the class outside its top-k and below tau.
    """

    loss: Tensor
    per_sample_loss: Tensor
    probs: Tensor
    topk: Tensor
    failed: Tensor


def default_top_k(num_classes: int) -> int:
    """k of the failure test for ``num_classes`` classes (METHOD.md): 0.5% of them, at least 1.

    ``max(1, round(0.005 * classes))`` with halves rounded up: 1000 -> 5, 10 -> 1, 300 -> 2.
    """
    return max(1, math.floor(0.005 * num_classes + 0.5))


NOTHING_DRAWN = ("ignore", "member", "all")  # ClassifierEnsemble's nothing_drawn rules
LOSS_OVER = ("outputs", "classes")  # what the surrogate loss's p_m(c) is normalised over


class ClassifierEnsemble(nn.Module):
    """The discriminator D of SAGE: frozen classifiers that must all miss the class.

    Surrogate loss for class c: ``mean_m (2 p_m(c) - 1)`` per sample (minimise it to drive every
    member away from c). A sample is a failure when every member puts c outside its top-k and
    ``p_m(c) < tau``; k scales with the class count (:func:`default_top_k`: top-5 of ImageNet's 1000,
    top-1 of a 10-class world, where top-5 would wave through half the classes). With ``towards=True``
    (:meth:`targeted_loss`, for the universal-token search) the loss is ``mean_m (1 - 2 p_m(t))``
    (minimise it to pull every member towards t); ``failed`` keeps its meaning for the given class.
    Members are frozen (eval mode, no parameter grads); gradients flow to the images.

    Args:
        members: the classifiers, all with the same class list.
        top_k: k of the failure test; None: :func:`default_top_k` of the class count.
        tau: probability threshold of the failure test.
        views: (ours) nuisance views of each image (:mod:`sage_lightning.surrogate.views`: ``image``, ``gbr``,
            ``brg``, ``gray``, ``blur``, ``half``, ``stretch``); each member's probabilities are averaged over them
            before the loss and the failure test. ``["image"]`` (default): D on the image alone, as in the paper.
        nothing_drawn: (ours) what a top-1 reject output (``none``: nothing of the kind is drawn) does to the failure
            test: ``ignore`` (default, the paper's test), ``member`` (that member misses the class whatever its
            ``p_m(c)``), ``all`` (the image fails when every member's top-1 is a reject). Both measured in
            benchmarks/README.md (issue 19, seventh round); ShapesWorld ships ``ignore``.
        loss_over: (ours) the ``p_m(c)`` of the surrogate loss: ``outputs`` (default: the softmax over every output,
            rejects included) or ``classes`` (renormalised over the classes: moving a member onto a reject output
            does not lower the loss; ShapesWorld's D). The same for members without reject outputs; the failure
            test always uses ``outputs``. Only this paper loss (:meth:`from_probs`); the embedding searches' ``log``
            and ``margin`` losses (``sage_lightning.embedding.member_loss``) are their own.

    Shape:
        - images: :math:`(B, 3, H, W)` in [0, 1], any size (members resize).
        - target: :math:`(B,)` long class indices.
        - output: :class:`EnsembleOutput`.
    """

    def __init__(self, members: list[EnsembleMember], top_k: int | None = None, tau: float = 0.1,
                 views: Sequence[str] = ("image",), nothing_drawn: str = "ignore",
                 loss_over: str = "outputs") -> None:
        super().__init__()
        self.views = check_views(views)
        members = list(members)
        if not members:
            raise SageError("the ensemble has no members; give at least one EnsembleMember")
        for i, m in enumerate(members):
            if not isinstance(m, EnsembleMember):
                raise SageError(f"ensemble member {i} is a {type(m).__name__}; give EnsembleMember instances")
        ref = list(members[0].class_names)
        for i, m in enumerate(members[1:], start=1):
            names = list(m.class_names)
            if names != ref:
                diff = next((j for j, (a, b) in enumerate(zip(ref, names, strict=False)) if a != b), None)
                where = (
                    f"{len(names)} classes vs {len(ref)}"
                    if diff is None
                    else f"class {diff} is {names[diff]!r} vs {ref[diff]!r}"
                )
                raise SageError(
                    f"ensemble member {i} ({type(m).__name__}) has a different class list than member 0 "
                    f"({where}); give every member the same class_names"
                )
        rejects = max((list(m.reject_names) for m in members), key=len)
        for i, m in enumerate(members):
            if list(m.reject_names) != rejects[: len(m.reject_names)]:
                raise SageError(
                    f"ensemble member {i} ({type(m).__name__}) has reject outputs {list(m.reject_names)} that "
                    f"differ from another member's {rejects}; give every member the same reject_names (or none)"
                )
        top_k = default_top_k(len(ref)) if top_k is None else top_k
        if not 1 <= int(top_k) <= len(ref):
            raise SageError(f"top_k={top_k} is out of range; use 1..{len(ref)}")
        if not 0.0 < float(tau) <= 1.0:
            raise SageError(f"tau={tau} is out of range; use a probability in (0, 1]")
        self.members = nn.ModuleList(members)
        self.top_k = int(top_k)
        self.tau = float(tau)
        self.nothing_drawn = check_choice(nothing_drawn, NOTHING_DRAWN, "nothing_drawn")
        self.loss_over = check_choice(loss_over, LOSS_OVER, "loss_over")
        self.requires_grad_(False)
        self.train(False)

    @property
    def class_names(self) -> list[str]:
        return list(self.members[0].class_names)

    @property
    def num_classes(self) -> int:
        return len(self.members[0].class_names)

    def resolve(self, names_or_indices: Sequence[str | int] | str | int) -> list[int]:
        """Class names or indices as indices into this ensemble's class list (SageError if unknown)."""
        return resolve_classes(names_or_indices, self.class_names)

    def train(self, mode: bool = True) -> ClassifierEnsemble:
        return super().train(False)

    @property
    def output_names(self) -> list[str]:
        """Names of ``member_probs``' columns: the classes, then the reject outputs of the member with most."""
        return max((m.output_names for m in self.members), key=len)

    def member_probs(self, images: Tensor) -> Tensor:
        """Softmax probabilities of every member, :math:`(M, B, C + R)` (float32): each member's softmax over its
        own outputs (classes and rejects), averaged over the ensemble's ``views``; a member with fewer reject
        outputs has probability 0 in the others."""
        batch, n_views = images.shape[0], len(self.views)
        viewed = images if self.views == ["image"] else stack_views(images, self.views)
        probs = [m(viewed).float().softmax(-1) for m in self.members]
        width = len(self.output_names)
        probs = torch.stack([F.pad(p, (0, width - p.shape[-1])) for p in probs])  # [M, V * B, C + R]
        return probs.view(len(self.members), n_views, batch, width).mean(1)

    def forward(self, images: Tensor, target: Tensor, towards: bool = False) -> EnsembleOutput:
        target = self._check_target(images, target)
        probs_all = self.member_probs(images)  # [M, B, C]
        return self.from_probs(probs_all, target, towards=towards)

    def targeted_loss(self, images: Tensor, target: Tensor) -> EnsembleOutput:
        """Loss ``mean_m (1 - 2 p_m(t))`` towards class t (universal-token search)."""
        return self(images, target, towards=True)

    def from_probs(self, probs_all: Tensor, target: Tensor, towards: bool = False) -> EnsembleOutput:
        """Loss and failure decision from member probabilities :math:`(M, B, C)` and target :math:`(B,)`."""
        M, B, _ = probs_all.shape
        idx = target.to(probs_all.device).view(1, B, 1).expand(M, B, 1)
        p = probs_all.gather(-1, idx).squeeze(-1)  # [M, B]
        topk = probs_all.detach().topk(self.top_k, dim=-1).indices  # [M, B, k]
        in_topk = (topk == idx).any(-1)  # [M, B]
        sees_nothing = topk[..., 0] >= self.num_classes  # [M, B]: top-1 is a reject output
        below = p.detach() < self.tau
        if self.nothing_drawn == "member":
            below = below | sees_nothing
        failed = (~in_topk & below).all(0)  # [B]
        if self.nothing_drawn == "all":
            failed = failed | sees_nothing.all(0)
        p_loss = p
        if self.loss_over == "classes":  # p_m(c) among the classes: a reject output's share does not count
            p_loss = p / probs_all[..., : self.num_classes].sum(-1).clamp_min(1e-6)
        per_sample = (1 - 2 * p_loss).mean(0) if towards else (2 * p_loss - 1).mean(0)
        return EnsembleOutput(
            loss=per_sample.mean(), per_sample_loss=per_sample, probs=p, topk=topk, failed=failed
        )

    def _check_target(self, images: Tensor, target: Tensor | Sequence[int] | int) -> Tensor:
        _check_images(images)
        B = images.shape[0]
        target = torch.as_tensor(target, device=images.device)
        if target.ndim == 0:
            target = target.expand(B)
        if target.shape != (B,) or target.dtype.is_floating_point or target.dtype == torch.bool:
            raise SageError(
                f"target has shape {tuple(target.shape)}, dtype {target.dtype}; pass class indices [B] (long)"
            )
        target = target.long()
        if bool(((target < 0) | (target >= self.num_classes)).any()):
            raise SageError(
                f"target {target.tolist()} has indices out of range; use 0..{self.num_classes - 1} "
                "(ensemble.resolve(names) maps names to indices)"
            )
        return target


def member_names(ensemble: ClassifierEnsemble) -> list[str]:
    """Readable, unique names of the members, for result files (``0:resnet10t``, ``2:canny+resnet10t``)."""

    def name(member: nn.Module) -> str:
        inner = getattr(member, "classifier", None)
        if inner is not None:
            return "canny+" + name(inner)
        return getattr(member, "model_name", type(member).__name__)

    return [f"{i}:{name(m)}" for i, m in enumerate(ensemble.members)]
