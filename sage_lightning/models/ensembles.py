"""The discriminator D that goes with a model source when the config names none."""

from __future__ import annotations

import torch

from sage_lightning.errors import SageError
from sage_lightning.surrogate import CannyEdgeMember, ClassifierEnsemble, TimmMember
from sage_lightning.worlds import DEFAULT_WORLD, find_world


def tiny_ensemble(class_names: list[str]) -> ClassifierEnsemble:
    """Random timm test models (two architectures and a Canny-edge member) on ``class_names``: fixed weights, the
    caller's global random state left as it was (debugging only: meaningless)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        members = [TimmMember("test_resnet", class_names), TimmMember("test_vit", class_names)]
        members.append(CannyEdgeMember(TimmMember("test_resnet", class_names)))
    return ClassifierEnsemble(members)


def default_ensemble(source: str) -> ClassifierEnsemble:
    """The discriminator D that goes with a model source when the config names none.

    A world (``shapesworld``): the world's own classifiers. ``tiny``, ``tiny-xl``, ``tiny-sd3``, ``tiny-flux``:
    random timm test models on the default world's class names (:func:`tiny_ensemble`). Other sources have no
    default: a config must list the members (see configs/models/).
    """
    from sage_lightning.flow_models import is_tiny_source  # here: flow_models stands on this package

    if is_tiny_source(source):
        world = find_world(DEFAULT_WORLD)
        return tiny_ensemble(list(world.class_names))
    world = find_world(source)
    if world is not None:
        return world.default_ensemble()
    raise SageError(
        f"model {source!r} has no default ensemble: list the members under model.ensemble in the config "
        "(see configs/models/sd15.yaml)"
    )
