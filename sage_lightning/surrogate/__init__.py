"""The discriminator D of SAGE: a frozen classifier ensemble and its surrogate loss."""

from sage_lightning.surrogate.classnames import imagenet_class_names, resolve_classes
from sage_lightning.surrogate.ensemble import ClassifierEnsemble, EnsembleOutput
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
    "imagenet_class_names",
    "resolve_classes",
]
