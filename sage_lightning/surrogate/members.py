"""Members of the discriminator D: frozen, differentiable image classifiers with their own preprocessing.

Every member maps images in [0, 1] of any size to logits over its class list; it resizes and
normalises the images itself, with differentiable ops, so gradients reach the input image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sage_lightning.errors import SageError, closest_names
from sage_lightning.surrogate.classnames import class_names_from_spec

# cv2.cvtColor(RGB2GRAY) weights, reused by the differentiable edge surrogate.
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise SageError(f"images have shape {tuple(images.shape)}; pass RGB images [B, 3, H, W] in [0, 1]")


def _resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Differentiable bilinear resize (no antialias) to ``size`` = (H, W); a no-op at that size."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=False)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    return (size[-2], size[-1])


class EnsembleMember(nn.Module):
    """One frozen classifier of the discriminator D.

    Subclasses set ``class_names`` and implement ``logits``. The member is always in eval mode
    (``train()`` is a no-op) and its parameters never require grad.

    Shape:
        - images01: :math:`(B, 3, H, W)` in [0, 1], any H and W.
        - output: :math:`(B, C)` logits, C = ``num_classes``.
    """

    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def freeze(self) -> EnsembleMember:
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> EnsembleMember:
        # Frozen for good: Lightning's model.train() must not switch BatchNorm/Dropout on.
        return super().train(False)

    def logits(self, images01: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, images01: Tensor) -> Tensor:
        _check_images(images01)
        return self.logits(images01)

    def _param_dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.float32


class TimmMember(EnsembleMember):
    """A timm image classifier as a member of the discriminator D.

    Any ``timm`` model name. Preprocessing follows the model's own data config
    (``timm.data.resolve_data_config``): bilinear resize to its input size, then its mean/std.
    Local weights: ``checkpoint_path`` to a ``.safetensors`` file or a torch file read with
    ``weights_only=True``.

    Args:
        model_name: timm model name, e.g. ``"convnext_base.fb_in22k_ft_in1k"``.
        class_names: names of the model's output classes in order, or ``"imagenet"``.
        pretrained: let timm load its pretrained weights (downloads if not cached).
        checkpoint_path: local state dict for the model (strict load).
        model_kwargs: extra ``timm.create_model`` keyword arguments.

    Shape:
        - images01: :math:`(B, 3, H, W)` in [0, 1]. Output: :math:`(B, C)` logits.
    """

    def __init__(
        self,
        model_name: str,
        class_names: list[str] | str,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        model_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        import timm

        self.class_names = class_names_from_spec(class_names)
        kwargs = dict(model_kwargs or {})
        kwargs.setdefault("num_classes", self.num_classes)
        if ":" not in model_name and not timm.is_model(model_name):  # hf-hub:/local-dir: go to timm as is
            close = ", ".join(repr(c) for c in closest_names(model_name, timm.list_models())) or "none close"
            raise SageError(f"unknown timm model {model_name!r}: did you mean {close}? (see timm.list_models())")
        self.model_name = model_name
        self.model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
        if checkpoint_path is not None:
            self.model.load_state_dict(_load_state_dict(checkpoint_path), strict=True)
        if self.model.num_classes != self.num_classes:
            raise SageError(
                f"timm model {model_name!r} has {self.model.num_classes} classes but class_names has "
                f"{self.num_classes}; make class_names match the model's head"
            )
        cfg = timm.data.resolve_data_config({}, model=self.model)
        self.input_size = _pair(cfg["input_size"])
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def logits(self, images01: Tensor) -> Tensor:
        x = _resize(images01.to(self._param_dtype()), self.input_size)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self.model(x)


def _load_state_dict(path: str) -> dict[str, Tensor]:
    p = Path(path)
    if not p.is_file():
        raise SageError(f"checkpoint {path!r} does not exist; pass the path of a .safetensors or .pt file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    state = torch.load(str(p), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            return state[key]
    return state


DEFAULT_TEMPLATES = ["a photo of a {}.", "a photo of the {}.", "art of the {}.", "a {} in a video game."]


class OpenClipZeroShotMember(EnsembleMember):
    """An open_clip zero-shot classifier as a member of the discriminator D.

    Text features of each class are averaged over ``templates`` (each with one ``{}`` for the
    class name), normalised, and cached once as a buffer. Logits are
    ``logit_scale * normalize(image_features) @ text_features.T`` (plus ``logit_bias`` if the
    model has one). Preprocessing: bilinear resize to ``model.visual.image_size`` (a direct
    resize, not open_clip's resize-then-center-crop; equal for square images), then the model's
    mean/std.

    Args:
        model_name: open_clip model name (``"ViT-B-32"``) or ``"local-dir:/path"`` / ``"hf-hub:org/repo"``.
        pretrained: open_clip pretrained tag (``"laion2b_s34b_b79k"``) or local file; None = random.
        class_names: class names in order, or ``"imagenet"``.
        templates: prompt templates; default a few of open_clip's ImageNet templates.

    Shape:
        - images01: :math:`(B, 3, H, W)` in [0, 1]. Output: :math:`(B, C)` logits.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        class_names: list[str] | str = "imagenet",
        templates: list[str] | None = None,
    ) -> None:
        super().__init__()
        import open_clip

        self.class_names = class_names_from_spec(class_names)
        templates = list(templates) if templates is not None else list(DEFAULT_TEMPLATES)
        bad = [t for t in templates if t.count("{}") != 1]
        if not templates or bad:
            raise SageError(f"bad templates {bad or templates!r}; each template needs exactly one '{{}}'")
        self.model_name = model_name
        self.model = open_clip.create_model(model_name, pretrained=pretrained)
        self.model.requires_grad_(False).eval()
        visual = self.model.visual
        self.input_size = _pair(visual.image_size)
        pp = getattr(visual, "preprocess_cfg", None) or {}
        mean = pp.get("mean") or getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = pp.get("std") or getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        tokenizer = open_clip.get_tokenizer(model_name)
        self.register_buffer("text_features", self._text_features(tokenizer, templates), persistent=False)
        self.freeze()

    @torch.no_grad()
    def _text_features(self, tokenizer, templates: list[str]) -> Tensor:
        feats = []
        for name in self.class_names:
            tokens = tokenizer([t.format(name) for t in templates])
            f = F.normalize(self.model.encode_text(tokens).float(), dim=-1).mean(0)
            feats.append(F.normalize(f, dim=-1))
        return torch.stack(feats)  # [C, D]

    def logits(self, images01: Tensor) -> Tensor:
        x = _resize(images01.to(self._param_dtype()), self.input_size)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        feats = F.normalize(self.model.encode_image(x).float(), dim=-1)
        logits = self.model.logit_scale.exp().float() * feats @ self.text_features.float().T
        bias = getattr(self.model, "logit_bias", None)
        if bias is not None:
            logits = logits + bias.float()
        return logits


class CannyEdgeMember(EnsembleMember):
    """The edge member of the discriminator D: a classifier shown the image's Canny edge map.

    Forward value: exactly ``cv2.Canny`` of the image (``(img*255).round()`` -> uint8,
    ``cv2.cvtColor(RGB2GRAY)``, ``cv2.Canny(gray, low, high)``; on CPU). Backward: straight-through a
    differentiable surrogate, ``tanh(sobel_magnitude / high_threshold)`` of the same grayscale
    image in 0..255 units. The 0/1 edge map is drawn as a sketch, **black edges on white**
    (``1 - edges``) by default, replicated to 3 channels and given to ``classifier``.

    Args:
        classifier: the member that classifies the sketch (e.g. a :class:`TimmMember`).
        low_threshold, high_threshold: Canny hysteresis thresholds.
        l2_gradient: Canny's ``L2gradient`` flag (the surrogate uses the same norm).
        black_on_white: draw edges black on white (True) or white on black (False).

    Shape:
        - images01: :math:`(B, 3, H, W)` in [0, 1]. Output: :math:`(B, C)` logits of ``classifier``.
    """

    def __init__(
        self,
        classifier: EnsembleMember,
        low_threshold: float = 100,
        high_threshold: float = 200,
        l2_gradient: bool = False,
        black_on_white: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(classifier, EnsembleMember):
            raise SageError(
                f"CannyEdgeMember.classifier is a {type(classifier).__name__}; pass an EnsembleMember "
                "such as TimmMember"
            )
        if not 0 <= low_threshold <= high_threshold:
            raise SageError(
                f"bad Canny thresholds low={low_threshold}, high={high_threshold}; use 0 <= low <= high"
            )
        self.classifier = classifier
        self.class_names = classifier.class_names
        self.low_threshold = float(low_threshold)
        self.high_threshold = float(high_threshold)
        self.l2_gradient = bool(l2_gradient)
        self.black_on_white = bool(black_on_white)
        sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        self.register_buffer("sobel", torch.stack([sobel_x, sobel_x.T]).unsqueeze(1), persistent=False)
        self.register_buffer("gray_weights", torch.tensor(_GRAY_WEIGHTS).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def canny(self, images01: Tensor) -> Tensor:
        """Exact ``cv2.Canny`` maps as 0/1 floats, :math:`(B, 1, H, W)`, no gradient."""
        _check_images(images01)
        u8 = (images01.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
        u8 = u8.permute(0, 2, 3, 1).cpu().numpy()
        maps = []
        for img in u8:
            gray = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)
            maps.append(cv2.Canny(gray, self.low_threshold, self.high_threshold, L2gradient=self.l2_gradient))
        edges = torch.from_numpy(np.stack(maps)).unsqueeze(1)
        return (edges > 0).to(device=images01.device, dtype=images01.dtype)

    def edge_surrogate(self, images01: Tensor) -> Tensor:
        """Differentiable edge strength in [0, 1), :math:`(B, 1, H, W)`: tanh(Sobel magnitude / high)."""
        gray = (images01 * self.gray_weights.to(images01.dtype)).sum(1, keepdim=True) * 255
        g = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), self.sobel.to(gray.dtype))
        if self.l2_gradient:
            mag = g.pow(2).sum(1, keepdim=True).add(1e-6).sqrt()
        else:
            mag = g.abs().sum(1, keepdim=True)
        return torch.tanh(mag / max(self.high_threshold, 1.0))

    def edge_map(self, images01: Tensor) -> Tensor:
        """Canny edge map (1 = edge), :math:`(B, 1, H, W)`: Canny's exact value, the surrogate's gradient."""
        # canny + (s - s.detach()): the value is bit-exact Canny (s - s.detach() == 0 exactly, unlike
        # s + (canny - s).detach(), which can round), the gradient is the surrogate's.
        surrogate = self.edge_surrogate(images01)
        return self.canny(images01) + (surrogate - surrogate.detach())

    def sketch(self, images01: Tensor) -> Tensor:
        """The 3-channel sketch shown to the classifier, :math:`(B, 3, H, W)` in [0, 1]."""
        edges = self.edge_map(images01)
        drawn = 1 - edges if self.black_on_white else edges
        return drawn.expand(-1, 3, -1, -1)

    def logits(self, images01: Tensor) -> Tensor:
        return self.classifier(self.sketch(images01))
