"""Adversarial training of ShapesWorld's RGB members (shapesworld/adversarial.py): the PGD images stay in the
ball (and the recolouring in its box) and in [0, 1], raise the member's loss, leave batch-norm statistics alone,
and reach the training step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sage_lightning.shapesworld.adversarial import ColourBox, pgd_images
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


def test_recolouring_attack_is_a_bounded_colour_map_plus_the_pixel_ball(batch):
    """With a ``ColourBox`` every attacked image is ``(I + E) x + b`` within the box plus at most ``eps`` per pixel:
    fitted back per image by least squares (noise images in mid-range, so the fit is well posed and nothing
    clips), E and b lie in their bounds and the residual in the ball; the colour map moves the image far beyond
    the ball and raises the loss."""
    _, y = batch
    x = 0.35 + 0.3 * torch.rand(len(y), 3, 64, 64, generator=torch.Generator().manual_seed(2))
    net = _net()
    box, eps = ColourBox(gain=0.2, mix=0.05, offset=0.05), 1e-3
    adv = pgd_images(net, net.classify_prepared, x, y, eps, 3, torch.Generator().manual_seed(1), colour=box)
    assert (adv - x).abs().amax() > 20 * eps
    for clean, attacked in zip(x, adv, strict=True):
        design = torch.cat([clean.reshape(3, -1).T, torch.ones(clean[0].numel(), 1)], 1).double()  # [HW, 4]
        fit = torch.linalg.lstsq(design, attacked.reshape(3, -1).T.double()).solution  # [4, 3]
        matrix, offset = fit[:3].T.float() - torch.eye(3), fit[3].float()
        assert (matrix.abs() <= box.matrix_bound() + 0.005).all() and (offset.abs() <= box.offset + 0.005).all()
        assert (design @ fit - attacked.reshape(3, -1).T.double()).abs().max() <= 2 * eps  # fit takes some ball
    net.eval()
    with torch.no_grad():
        clean_loss, attacked_loss = (F.cross_entropy(net.classify_prepared(v), y).item() for v in (x, adv))
    assert attacked_loss > clean_loss + 0.01


def test_colour_box_refuses_maps_that_could_erase_a_shape():
    """gain + 2 mix >= 1 lets a colour matrix be singular: the shape could vanish under its own label."""
    with pytest.raises(ValueError, match="gain \\+ 2 mix < 1"):
        ColourBox(gain=0.6, mix=0.2)


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


class _Built(Exception):
    """Raised in place of building the training module: the test has seen its arguments."""


@pytest.fixture
def module_arguments(monkeypatch) -> dict:
    """The keyword arguments ``classifiers.train`` builds its ``ClassifierModule`` with (it raises ``_Built``
    instead of training)."""
    import sage_lightning.shapesworld.classifiers as classifiers

    seen: dict = {}

    def capture(member, **kwargs):
        seen.update(kwargs)
        raise _Built

    monkeypatch.setattr(classifiers, "ClassifierModule", capture)
    return seen


@pytest.mark.parametrize(("name", "eps", "twin"), [("resnet_adv", 0.031, "resnet"), ("densenet_adv", 0.031, "densenet"),
                                                   ("resnet", 0.0, None)])
def test_members_train_with_their_own_recipe(name, eps, twin, module_arguments):
    """``train`` (and so ``sage-shapesworld build``) trains the *_adv members with PGD, warm-started from their
    plain twin's shipped weights; the plain members without either; no shipped member is recoloured."""
    import sage_lightning.shapesworld.classifiers as classifiers

    seen = module_arguments
    with pytest.raises(_Built):
        classifiers.train(name, n_train=4, n_reject=4, export=False)
    assert seen["adv_eps"] == eps and seen["adv_colour"] is False
    assert seen["init_from"] == (str(classifiers.CLASSIFIERS_DIR / twin) if twin else None)


def test_colour_attack_is_asked_for_on_the_command_line(module_arguments, monkeypatch, capsys):
    """``classifiers train --adv-colour`` reaches the training step's PGD as a ``ColourBox``; without a pixel ball
    it is refused, on the command line in one line."""
    import numpy as np

    import sage_lightning.shapesworld.classifiers as classifiers

    seen = module_arguments
    tiny = (np.zeros((4, 64, 64, 3), np.uint8), np.zeros(4, np.int64), np.zeros(4, np.int64))
    monkeypatch.setattr(classifiers, "training_set", lambda *a, **k: tiny)
    with pytest.raises(_Built):
        classifiers.main(["train", "--name", "resnet_adv", "--adv-colour", "--no-export"])
    assert seen["adv_colour"] is True and seen["adv_eps"] == 0.031
    with pytest.raises(ValueError, match="adv_eps > 0"):
        classifiers.train("resnet", export=False, adv_colour=True)
    with pytest.raises(SystemExit) as refused:  # on the command line: one line, no traceback
        classifiers.main(["train", "--name", "resnet", "--adv-colour", "--no-export"])
    assert refused.value.code == 2 and "give adv_eps > 0" in capsys.readouterr().err.splitlines()[-1]
    monkeypatch.undo()
    module = ClassifierModule("resnet", steps=10, adv_eps=0.03, adv_colour=True)
    module.log = lambda *a, **k: None
    colours = []
    monkeypatch.setattr(classifiers, "pgd_images", lambda *a, colour=None: colours.append(colour) or a[2])
    module.training_step((torch.zeros(2, 64, 64, 3, dtype=torch.uint8), torch.tensor([0, 1])), 0)
    assert colours == [ColourBox()]
