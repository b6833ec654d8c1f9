"""Adversarial training of ShapesWorld's RGB members (shapesworld/adversarial.py): the PGD images stay in the
ball and in [0, 1], raise the member's loss, leave batch-norm statistics alone, and reach the training step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sage_lightning.shapesworld.adversarial import pgd_images
from sage_lightning.shapesworld.classifiers import ClassifierModule, ShapesClassifier, full_config
from sage_lightning.shapesworld.generator import make_batch


@pytest.fixture(scope="module")
def batch():
    images, _, ids, _ = make_batch(8, seed=4321)
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(ids).long()


def _net() -> ShapesClassifier:
    torch.manual_seed(0)
    return ShapesClassifier(full_config("resnet"))


def test_pgd_stays_in_the_ball_and_raises_the_loss(batch):
    x, y = batch
    net = _net().train()
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    stats = bn.running_mean.clone()
    eps = 0.03
    adv = pgd_images(net, net.classify_prepared, x, y, eps, 3, torch.Generator().manual_seed(1))
    assert adv.shape == x.shape and not adv.requires_grad
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert net.training and torch.equal(bn.running_mean, stats)  # attacked in eval mode, mode restored
    net.eval()
    with torch.no_grad():
        clean, attacked = (F.cross_entropy(net.classify_prepared(v), y).item() for v in (x, adv))
    assert attacked > clean + 0.01
    again = pgd_images(net, net.classify_prepared, x, y, eps, 3, torch.Generator().manual_seed(1))
    assert torch.equal(adv, again)  # seeded by the caller's generator


def test_pgd_refuses_an_empty_ball(batch):
    x, y = batch
    net = _net()
    with pytest.raises(ValueError, match="eps > 0"):
        pgd_images(net, net.classify_prepared, x, y, 0.0, 3, torch.Generator())


def test_training_step_learns_on_clean_and_attacked_images(batch, monkeypatch):
    """With adv_eps the step's loss is over the clean and the PGD half (twice the batch), seen by the net."""
    x, y = batch
    module = ClassifierModule("resnet", steps=10, adv_eps=0.03, adv_steps=2)
    module.log = lambda *a, **k: None
    sizes = []
    forward = module.net.classify_prepared
    monkeypatch.setattr(module.net, "classify_prepared", lambda v: sizes.append(len(v)) or forward(v))
    images_u8 = (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
    loss = module.training_step((images_u8, y), 0)
    assert sizes == [8, 8, 16]  # two PGD steps on the batch, then the clean and attacked halves together
    loss.backward()
    assert all(p.grad is not None for p in module.net.model.parameters() if p.requires_grad)


def test_edge_member_refuses_pixel_attacks():
    with pytest.raises(ValueError, match="Canny"):
        ClassifierModule("edge", steps=10, adv_eps=0.03)


@pytest.mark.parametrize(("name", "eps", "twin"), [("resnet_adv", 0.031, "resnet"), ("densenet_adv", 0.031, "densenet"),
                                                   ("resnet", 0.0, None)])
def test_members_train_with_their_own_recipe(name, eps, twin, monkeypatch):
    """``train`` (and so ``sage-shapesworld build``) trains the *_adv members with PGD, warm-started from their
    plain twin's shipped weights; the plain members without either."""
    import sage_lightning.shapesworld.classifiers as classifiers

    class Built(Exception):
        pass

    seen = {}

    def capture(member, **kwargs):
        seen.update(kwargs)
        raise Built

    monkeypatch.setattr(classifiers, "ClassifierModule", capture)
    with pytest.raises(Built):
        classifiers.train(name, n_train=4, n_reject=4, export=False)
    assert seen["adv_eps"] == eps
    assert seen["init_from"] == (str(classifiers.CLASSIFIERS_DIR / twin) if twin else None)
