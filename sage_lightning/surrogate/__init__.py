"""The discriminator D of SAGE: a frozen classifier ensemble and its surrogate loss."""

from sage_lightning.surrogate.classnames import imagenet_class_names, resolve_classes
from sage_lightning.surrogate.ensemble import ClassifierEnsemble, EnsembleOutput, default_top_k
from sage_lightning.surrogate.members import (
    CannyEdgeMember,
    EnsembleMember,
    OpenClipZeroShotMember,
    TimmMember,
)

__all__ = [
    "CannyEdgeMember",
    "ClassifierEnsemble",
    "EnsembleMember",
    "EnsembleOutput",
    "OpenClipZeroShotMember",
    "TimmMember",
    "default_top_k",
    "imagenet_class_names",
    "resolve_classes",
]
