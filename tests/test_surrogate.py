"""The discriminator D: surrogate loss, failure decision, gradients, exact Canny, class-name errors."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch
import torchvision

from sage_lightning.errors import SageError
from sage_lightning.surrogate import (
    CannyEdgeMember,
    ClassifierEnsemble,
    EnsembleMember,
    OpenClipZeroShotMember,
    TimmMember,
    default_top_k,
    imagenet_class_names,
    resolve_classes,
)

NAMES = [f"class{i}" for i in range(10)]


class FixedProbsMember(EnsembleMember):
    """Returns log(probs) for every image, so its softmax is ``probs`` (one row per sample)."""

    def __init__(self, probs: list[list[float]], class_names: list[str] = NAMES) -> None:
        super().__init__()
        self.class_names = list(class_names)
        self.register_buffer("fixed", torch.tensor(probs, dtype=torch.float64).log().float())

    def logits(self, images01: torch.Tensor) -> torch.Tensor:
        return self.fixed[: images01.shape[0]] + 0 * images01.mean((1, 2, 3))[:, None]


@pytest.fixture(scope="module")
def timm_member() -> TimmMember:
    torch.manual_seed(0)
    return TimmMember("test_resnet", NAMES, pretrained=False)


@pytest.fixture(scope="module")
def clip_member(tmp_path_factory) -> OpenClipZeroShotMember:
    folder = tmp_path_factory.mktemp("tiny_clip")
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    }
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    torch.manual_seed(0)
    templates = ["a photo of a {}.", "art of the {}."]
    return OpenClipZeroShotMember(f"local-dir:{folder}", None, NAMES[:4], templates)


def _images(b: int = 2, size: int = 40) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(b, 3, size, size)


def _probs_with(target_prob: float, top: list[float], n: int = 10) -> list[float]:
    """A distribution over n classes: class 0 gets target_prob, classes 1.. get ``top``, the rest share."""
    rest = n - 1 - len(top)
    return [target_prob, *top] + [(1 - target_prob - sum(top)) / rest] * rest


def test_loss_matches_hand_computation():
    p1 = [[0.5, 0.2, 0.1, 0.05, 0.05, 0.04, 0.03, 0.01, 0.01, 0.01]] * 2
    p2 = [[0.1, 0.6, 0.1, 0.05, 0.05, 0.04, 0.03, 0.01, 0.01, 0.01]] * 2
    ens = ClassifierEnsemble([FixedProbsMember(p1), FixedProbsMember(p2)], top_k=5, tau=0.1)
    target = torch.tensor([0, 2])
    out = ens(_images(), target)
    expected = [((2 * p1[0][c] - 1) + (2 * p2[0][c] - 1)) / 2 for c in (0, 2)]  # [0.1, -0.8]
    assert out.per_sample_loss.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.loss.item() == pytest.approx(sum(expected) / 2, abs=1e-6)
    assert out.probs.shape == (2, 2) and out.topk.shape == (2, 2, 5) and out.failed.shape == (2,)
    assert out.probs[:, 0].tolist() == pytest.approx([0.5, 0.1], abs=1e-6)
    assert out.topk[1, 0, 0].item() == 1
    towards = ens.targeted_loss(_images(), target)
    assert towards.per_sample_loss.tolist() == pytest.approx([-e for e in expected], abs=1e-6)
    assert ens(_images(), target, towards=True).loss.item() == pytest.approx(-sum(expected) / 2, abs=1e-6)


def test_failure_decision():
    fooled = _probs_with(0.01, [0.3, 0.2, 0.2, 0.1, 0.1])  # c=0 last, p < tau
    in_topk = _probs_with(0.12, [0.5, 0.1, 0.1, 0.1])  # c=0 second: inside top-5
    confident_outside = _probs_with(0.11, [0.16] * 5)  # c=0 sixth, but p >= tau
    assert sorted(range(10), key=lambda j: -confident_outside[j]).index(0) == 5
    ens = ClassifierEnsemble(
        [FixedProbsMember([fooled, fooled, fooled]), FixedProbsMember([fooled, in_topk, confident_outside])],
        top_k=5,
        tau=0.1,
    )
    out = ens(_images(3), torch.zeros(3, dtype=torch.long))
    assert out.failed.tolist() == [True, False, False]
    assert out.failed.dtype == torch.bool


def test_gradients_reach_image_and_members_stay_frozen(timm_member, clip_member):
    edge = CannyEdgeMember(TimmMember("test_resnet", NAMES[:4]), low_threshold=50, high_threshold=100)
    for member in (timm_member, clip_member, edge):
        ens = ClassifierEnsemble([member], top_k=2)
        ens.train()  # Lightning calls this; members must stay in eval mode
        assert not any(m.training for m in ens.modules())
        assert not any(p.requires_grad for p in ens.parameters())
        x = _images(2, 48).requires_grad_(True)
        out = ens(x, torch.tensor([1, 3]))
        out.loss.backward()
        assert x.grad is not None and torch.isfinite(x.grad).all(), type(member).__name__
        assert x.grad.abs().sum() > 0, type(member).__name__
        assert all(p.grad is None for p in ens.parameters())


def test_edge_map_is_exactly_cv2_canny():
    rng = np.random.default_rng(0)
    img = np.full((64, 80, 3), 30, np.uint8)
    img[10:40, 15:50] = (200, 40, 90)
    cv2.circle(img, (55, 40), 15, (20, 220, 120), -1)
    img = np.clip(img.astype(int) + rng.integers(-25, 25, img.shape), 0, 255).astype(np.uint8)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    x = torch.cat([x, torch.rand(1, 3, 64, 80)]).requires_grad_(True)
    member = CannyEdgeMember(FixedProbsMember([[0.1] * 10] * 2), low_threshold=100, high_threshold=200)
    edges = member.edge_map(x)
    assert edges.shape == (2, 1, 64, 80)
    for i in range(2):
        u8 = (x[i].detach() * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        ref = cv2.Canny(cv2.cvtColor(np.ascontiguousarray(u8), cv2.COLOR_RGB2GRAY), 100, 200)
        assert ref.any()
        assert np.array_equal(edges[i, 0].detach().numpy(), (ref > 0).astype(np.float32))
    sketch = member.sketch(x)  # black edges on white
    assert sketch.shape == (2, 3, 64, 80) and torch.equal(sketch[:, 1], 1 - edges[:, 0])
    edges.sum().backward()  # straight-through: the surrogate's gradient reaches the image
    assert x.grad.abs().sum() > 0


def test_unknown_class_name_suggests_close_match():
    names = imagenet_class_names()
    assert len(names) == 1000 and names[0] == "tench"
    assert resolve_classes(["goldfish", 3, "7", "Tench"], names) == [1, 3, 7, 0]
    with pytest.raises(SageError, match="goldfish"):
        resolve_classes(["goldfsh"], names)
    with pytest.raises(SageError, match="ambiguous"):
        resolve_classes("missile", names)
    with pytest.raises(SageError, match="out of range"):
        resolve_classes([1000], names)
    ens = ClassifierEnsemble([FixedProbsMember([[0.1] * 10])])
    assert ens.resolve(["class3"]) == [3]
    with pytest.raises(SageError, match="class3"):
        ens.resolve("clas3")


def test_a_reject_output_takes_part_in_softmax_and_top_k_but_is_never_a_class():
    """A member that puts its probability on its reject output ("none": nothing of the kind is drawn) has every
    class outside its top-k; a member without reject outputs gets probability 0 there (padded)."""
    rejecting = FixedProbsMember([[0.05] * 10 + [0.5]])
    rejecting.reject_names = ["none"]
    ordinary = FixedProbsMember([_probs_with(0.02, [0.5, 0.2])])
    ens = ClassifierEnsemble([rejecting, ordinary], tau=0.1)
    assert ens.class_names == NAMES and ens.output_names == [*NAMES, "none"] and ens.num_classes == 10
    probs = ens.member_probs(_images(1))
    assert probs.shape == (2, 1, 11) and probs[1, 0, 10] == 0
    out = ens(_images(1), torch.tensor([3]))
    assert out.topk[0, 0, 0].item() == 10 and out.failed.tolist() == [True]
    assert out.probs[0, 0].item() == pytest.approx(0.05, abs=1e-6)  # softmax over all 11 outputs
    other = FixedProbsMember([[0.1] * 10 + [0.0]])
    other.reject_names = ["background"]
    with pytest.raises(SageError, match="reject outputs"):
        ClassifierEnsemble([rejecting, other])


def test_nothing_drawn_rules_let_a_top_1_reject_fail_the_class_whatever_its_probability():
    """Top-1 ``none`` with p(c) = 0.3 >= tau: a miss under ``member``, not under ``ignore`` (the paper's test); under
    ``all`` the image fails only when every member's top-1 is a reject. A member whose top-1 is another class at
    p(c) = 0.3 holds the class under every rule."""
    none_top1 = FixedProbsMember([[0.07, 0.07, 0.07, 0.3] + [0.0] * 6 + [0.49]])  # class 3 at 0.3, none top-1
    none_top1.reject_names = ["none"]
    holding = FixedProbsMember([[0.4, 0.0, 0.0, 0.3] + [0.05] * 6 + [0.0]])  # top-1 class 0, class 3 at 0.3
    holding.reject_names = ["none"]
    missing = FixedProbsMember([[0.9, 0.0, 0.0, 0.02] + [0.08 / 6] * 6 + [0.0]])  # top-1 class 0, class 3 below tau
    missing.reject_names = ["none"]
    target = torch.tensor([3])
    cases = {  # members -> failed under ignore / member / all
        "one member, top-1 none": ([none_top1], (False, True, True)),
        "two members, both top-1 none": ([none_top1, none_top1], (False, True, True)),
        "top-1 none beside a member that misses": ([none_top1, missing], (False, True, False)),
        "top-1 none beside a member that holds": ([none_top1, holding], (False, False, False)),
    }
    for case, (members, expected) in cases.items():
        got = tuple(ClassifierEnsemble(members, tau=0.1, nothing_drawn=rule)(_images(1), target).failed.item()
                    for rule in ("ignore", "member", "all"))
        assert got == expected, case
    out = ClassifierEnsemble([none_top1, holding, missing], tau=0.1)(_images(1), target)
    assert out.topk[:, 0, 0].tolist() == [10, 0, 0]
    assert out.probs[:, 0].tolist() == pytest.approx([0.3, 0.3, 0.02], abs=1e-5)
    with pytest.raises(SageError, match="nothing_drawn='some'"):
        ClassifierEnsemble([none_top1], nothing_drawn="some")


class NoneFromBrightness(FixedProbsMember):
    """Fixed probabilities, but the ``none`` logit grows with the image's mean: the only way the image moves it."""

    def logits(self, images01: torch.Tensor) -> torch.Tensor:
        out = self.fixed[: images01.shape[0]].clone()
        out[:, -1] = out[:, -1] + 4 * images01.mean((1, 2, 3))
        return out


def test_loss_over_classes_gives_no_reward_for_moving_a_member_onto_none():
    """``loss_over: classes`` renormalises p(c) over the classes: the loss is ``2 p(c) / sum_classes p - 1``, and an
    image change that only raises the ``none`` logit leaves it unchanged (gradient 0); under ``outputs`` that same
    change lowers the loss. The failure test and ``probs`` stay on the softmax over every output."""
    member = NoneFromBrightness([[0.07, 0.07, 0.07, 0.3] + [0.0] * 6 + [0.49]])
    member.reject_names = ["none"]
    target = torch.tensor([3])
    grads = {}
    for rule in ("outputs", "classes"):
        images = torch.zeros(1, 3, 8, 8, requires_grad=True)
        out = ClassifierEnsemble([member], tau=0.1, loss_over=rule)(images, target)
        expected = 2 * 0.3 / 0.51 - 1 if rule == "classes" else 2 * 0.3 - 1
        assert out.loss.item() == pytest.approx(expected, abs=1e-5), rule
        assert out.probs.item() == pytest.approx(0.3, abs=1e-5) and out.failed.tolist() == [False]
        out.loss.backward()
        grads[rule] = images.grad.abs().sum().item()
    assert grads["outputs"] > 1e-3 and grads["classes"] < 1e-7
    with pytest.raises(SageError, match="loss_over='rejects'"):
        ClassifierEnsemble([member], loss_over="rejects")


def test_timm_member_with_a_reject_output_has_one_more_logit():
    member = TimmMember("test_resnet", NAMES, reject_names=["none"])
    assert member.output_names == [*NAMES, "none"] and member.num_classes == 10
    assert member(_images(2)).shape == (2, 11)


def test_members_with_different_class_lists_are_rejected():
    other = [f"thing{i}" for i in range(10)]
    with pytest.raises(SageError, match="different class list.*class 0 is 'thing0'"):
        ClassifierEnsemble([FixedProbsMember([[0.1] * 10]), FixedProbsMember([[0.1] * 10], other)])
    with pytest.raises(SageError, match="different class list"):
        ClassifierEnsemble([FixedProbsMember([[0.1] * 10]), FixedProbsMember([[0.2] * 5], NAMES[:5])])
    with pytest.raises(SageError, match="top_k"):
        ClassifierEnsemble([FixedProbsMember([[0.1] * 10])], top_k=11)


def test_bad_target_is_a_clear_error():
    ens = ClassifierEnsemble([FixedProbsMember([[0.1] * 10] * 2)])
    with pytest.raises(SageError, match="out of range"):
        ens(_images(), torch.tensor([0, 10]))
    with pytest.raises(SageError, match="long"):
        ens(_images(), torch.tensor([0.0, 1.0]))
    assert math.isfinite(ens(_images(), 4).loss.item())  # a scalar target is broadcast over the batch


def test_ensemble_from_jsonargparse_config():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(ClassifierEnsemble, "discriminator")
    member = {"class_path": "sage_lightning.surrogate.TimmMember",
              "init_args": {"model_name": "test_resnet", "class_names": NAMES[:3]}}
    cfg = parser.parse_object({"discriminator": {"members": [member], "top_k": 2, "tau": 0.2}})
    ens = parser.instantiate(cfg).discriminator
    assert isinstance(ens, ClassifierEnsemble) and isinstance(ens.members[0], TimmMember)
    assert ens.top_k == 2 and ens.tau == 0.2 and ens.class_names == NAMES[:3]


@pytest.mark.parametrize(("classes", "k"), [(10, 1), (100, 1), (300, 2), (500, 3), (1000, 5), (21843, 109)])
def test_top_k_scales_with_the_class_count(classes, k):
    """k = max(1, round(0.005 x classes)), halves up (METHOD.md): top-5 would be half of a 10-class world."""
    member = FixedProbsMember([[1.0 / classes] * classes], class_names=[f"c{i}" for i in range(classes)])
    assert default_top_k(classes) == k
    assert ClassifierEnsemble([member]).top_k == k
    assert ClassifierEnsemble([member], top_k=2).top_k == 2  # an explicit k wins


def test_a_10_class_world_fails_a_class_that_is_only_second():
    """Issue 10 item 14: with top-5 of 10 classes, images that were no triangle (judge) still passed as
    triangles when the triangle came second; top-1 counts them as failures (p below tau)."""
    second = [_probs_with(0.09, [0.5, 0.05, 0.05, 0.05])]  # c=0 second, p < tau
    image, target = _images(1), torch.zeros(1, dtype=torch.long)
    assert ClassifierEnsemble([FixedProbsMember(second)])(image, target).failed.tolist() == [True]
    assert ClassifierEnsemble([FixedProbsMember(second)], top_k=5)(image, target).failed.tolist() == [False]


# ------------------------------------------- each member's own preprocessing (issue 10 item 10)
def _sd_sized_images(b: int = 2, h: int = 96, w: int = 80) -> torch.Tensor:
    """Images with one-pixel detail (aliasing shows) of a non-square size, in [0, 1]."""
    torch.manual_seed(3)
    return torch.rand(b, 3, h, w)


def test_timm_member_preprocesses_as_timm_eval_transform():
    """Resize the shortest edge to input/crop_pct with antialias in the model's interpolation, centre-crop,
    normalise: timm's own eval transform on a tensor."""
    from timm.data import create_transform, resolve_data_config

    for name in ("test_resnet", "test_vit"):  # bilinear / bicubic, crop_pct 0.95, 160 px
        member = TimmMember(name, NAMES)
        transform = create_transform(**resolve_data_config({}, model=member.model))
        images = _sd_sized_images()
        reference = torch.stack([transform(image) for image in images])
        ours = member.preprocess(images)
        assert ours.shape == reference.shape == (2, 3, 160, 160)
        assert (ours - reference).abs().max() < 1e-5, name


def test_open_clip_member_preprocesses_as_open_clip_transform(clip_member):
    import open_clip

    pp = clip_member.model.visual.preprocess_cfg
    transform = open_clip.image_transform(
        pp["size"], is_train=False, mean=pp["mean"], std=pp["std"], resize_mode=pp["resize_mode"],
        interpolation=pp["interpolation"],
    )
    images = _sd_sized_images()
    tensor_steps = [t for t in transform.transforms if type(t).__name__ in ("Resize", "CenterCrop", "Normalize")]
    assert len(tensor_steps) == 3  # the rest converts PIL images only
    reference = torch.stack([torchvision.transforms.Compose(tensor_steps)(image) for image in images])
    ours = clip_member.preprocess(images)
    assert ours.shape == reference.shape == (2, 3, 32, 32)
    assert (ours - reference).abs().max() < 1e-5


def test_preprocessing_keeps_gradients():
    member = TimmMember("test_resnet", NAMES)
    x = _sd_sized_images(1).requires_grad_(True)
    member.preprocess(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_shapesworld_members_preprocess_as_trained():
    """ShapesWorld's members were trained on 64-px images resized (bilinear) to 64, no crop (config.json
    "images"): their data config is that, not timm's defaults for the architecture (crop 0.875)."""
    from sage_lightning.models import default_ensemble

    ensemble = default_ensemble("shapesworld")
    images = _sd_sized_images(2, 64, 64)
    for member in ensemble.members:
        timm_member = getattr(member, "classifier", member)
        expected = (images - 0.5) / 0.5
        assert torch.allclose(timm_member.preprocess(images), expected, atol=1e-6)


def test_ngr_flags_a_norm_outlier_that_passes_ks():
    """A 4.5-sigma norm outlier at d = 1024 (issue 21 item 7): its entries look normal to KS, its norm does not."""
    from sage_lightning.metrics import gaussianity

    d = 1024
    sigma_norm = (2 * d) ** 0.5  # std of |z|^2 under chi-squared(d)
    rejected_ks = rejected_any = 0
    for seed in range(50):
        z = torch.randn(d, generator=torch.Generator().manual_seed(seed))
        z = z / z.norm() * (d + 4.5 * sigma_norm) ** 0.5  # |z|^2 at d + 4.5 sigma
        out = gaussianity(z)
        rejected_ks += out["ks_outlier"]
        rejected_any += out["outlier"]
        assert out["norm_outlier"] and out["norm_pvalue"] < 1e-4
    assert rejected_ks < 25 and rejected_any == 50
    typical = gaussianity(torch.randn(d, generator=torch.Generator().manual_seed(7)))
    assert not typical["outlier"] and typical["norm_pvalue"] > 0.01
    on_shell = torch.randn(d, generator=torch.Generator().manual_seed(8))
    assert not gaussianity(on_shell / on_shell.norm() * d**0.5)["norm_outlier"]  # the Gaussian shell passes


def test_contrast_stretch_keeps_a_faint_shape_s_edges_and_stays_exact_canny():
    """A shape a person still sees at low contrast keeps its Canny edges when the member stretches contrast
    (issue 19: D must hold there); a flat field stays flat; the stretched map is still exactly cv2.Canny."""
    from sage_lightning.surrogate.canny import stretch_of

    img = np.full((64, 64, 3), 120, np.uint8)
    cv2.circle(img, (32, 32), 16, (150, 150, 150), -1)  # 30 grey levels of contrast: faint but plain
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float().div(255)
    x = torch.cat([x, torch.full((1, 3, 64, 64), 0.5)]).requires_grad_(True)
    plain = CannyEdgeMember(FixedProbsMember([[0.1] * 10] * 2), 100, 200)
    stretched = CannyEdgeMember(FixedProbsMember([[0.1] * 10] * 2), 100, 200, stretch_contrast=True)
    assert plain.canny(x)[0].sum() == 0 and stretched.canny(x)[0].sum() > 50
    assert stretched.canny(x)[1].sum() == 0  # flat: below the least range, not stretched
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    shift, scale = stretch_of(gray)
    ref = cv2.Canny(np.clip(np.round((gray - shift) * scale), 0, 255).astype(np.uint8), 100, 200)
    assert np.array_equal(stretched.canny(x)[0, 0].detach().numpy(), (ref > 0).astype(np.float32))
    stretched.edge_map(x).sum().backward()
    assert x.grad[0].abs().sum() > 0


class RedMember(EnsembleMember):
    """Class 0 in proportion to the red channel's share of the image: colour is all it looks at."""

    def __init__(self) -> None:
        super().__init__()
        self.class_names = NAMES[:2]

    def logits(self, images01: torch.Tensor) -> torch.Tensor:
        red = images01[:, 0].mean((1, 2)) / images01.mean((1, 2, 3)).clamp_min(1e-6) / 3
        return torch.stack([10 * red, 10 * (1 - red)], -1)


def test_views_average_each_member_over_nuisance_views_and_carry_the_gradient():
    """D in views (ours): probabilities are the mean over the views, so a member fooled by colour alone cannot
    make D fail on a red image (two of the three colour views are not red); the gradient reaches the image."""
    from sage_lightning.surrogate.views import VIEWS, stack_views

    red = torch.zeros(2, 3, 16, 16)
    red[:, 0] = 0.9
    red.requires_grad_(True)
    plain = ClassifierEnsemble([RedMember()], top_k=1)
    viewed = ClassifierEnsemble([RedMember()], top_k=1, views=["image", "gbr", "brg"])
    assert plain(red.detach(), torch.tensor([1, 1])).failed.all()  # fooled: "class0" on the image alone
    p_views = viewed.member_probs(red.detach())
    per_view = torch.stack([RedMember()(VIEWS[v](red.detach())).softmax(-1) for v in viewed.views]).mean(0)
    torch.testing.assert_close(p_views[0], per_view)
    assert not viewed(red.detach(), torch.tensor([1, 1])).failed.any()  # the views disagree: no failure
    viewed(red, torch.tensor([0, 0])).loss.backward()
    assert red.grad.abs().sum() > 0
    assert stack_views(red.detach(), ["image", "half"]).shape == (4, 3, 16, 16)


def test_stretch_view_shows_a_washed_out_shape_at_full_contrast_and_leaves_a_flat_field_flat():
    """``stretch`` maps the luminance 1st-99th percentiles to 0-1 with one gain for every channel: a shape washed
    out to a luminance contrast of 0.16 comes out at full contrast with its hue order kept; a field with 1% noise is
    amplified at most by 1 / STRETCH_FLOOR; the gradient reaches the image."""
    from sage_lightning.surrogate.views import STRETCH_FLOOR, VIEWS

    washed = torch.full((1, 3, 32, 32), 0.5)
    washed[:, :, 8:24, 8:24] += torch.tensor([0.2, 0.15, 0.1]).view(1, 3, 1, 1)  # a pale orange square
    washed.requires_grad_(True)
    out = VIEWS["stretch"](washed).clamp(0, 1)
    inside, outside = out[0, :, 16, 16], out[0, :, 2, 2]
    assert (outside == 0).all() and inside[0] > 0.9 and inside[0] > inside[1] > inside[2]
    out.sum().backward()
    assert washed.grad.abs().sum() > 0
    noise = 0.5 + 0.01 * torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    spread = VIEWS["stretch"](noise).std() / noise.std()
    assert spread <= 1 / STRETCH_FLOOR + 1e-4


def test_unknown_or_empty_views_are_refused_in_one_line():
    with pytest.raises(SageError, match="unknown view 'grey'.*did you mean 'gray'"):
        ClassifierEnsemble([RedMember()], views=["image", "grey"])
    with pytest.raises(SageError, match="views is empty"):
        ClassifierEnsemble([RedMember()], views=[])
