"""Members of the discriminator D: frozen, differentiable image classifiers with their own preprocessing.

Every member maps images in [0, 1] of any size to logits over its class list; it preprocesses the images
itself exactly as its library's eval transform does (:class:`Preprocess`: antialiased resize, centre crop,
normalisation), with differentiable tensor ops, so gradients reach the input image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sage_lightning.errors import SageError, closest_names
from sage_lightning.surrogate.canny import canny_edges, stretch_of
from sage_lightning.surrogate.classnames import class_names_from_spec

# cv2.cvtColor(RGB2GRAY) weights, reused by the differentiable edge surrogate.
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise SageError(f"images have shape {tuple(images.shape)}; pass RGB images [B, 3, H, W] in [0, 1]")


class Preprocess(nn.Module):
    """A classifier's own eval preprocessing as differentiable tensor ops (torchvision's functional resize
    and centre crop, the ops timm's and open_clip's transforms run): resize to ``resize`` (an int: the
    shortest edge, keeping the aspect ratio; a pair: both edges) with antialias in ``interpolation``,
    centre-crop to ``size`` = (H, W), then ``(x - mean) / std``. Computed in float32.

    Shape:
        - images01: :math:`(B, 3, H, W)` in [0, 1], any size. Output: :math:`(B, 3, *size)`.
    """

    def __init__(
        self,
        size: tuple[int, int],
        resize: int | tuple[int, int],
        interpolation: str,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        from torchvision.transforms import InterpolationMode

        modes = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}
        if interpolation not in modes:
            raise SageError(f"interpolation {interpolation!r} is not supported: use bilinear or bicubic")
        self.size, self.resize, self.interpolation = tuple(size), resize, modes[interpolation]
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_timm(cls, cfg: dict) -> Preprocess:
        """timm's ``transforms_imagenet_eval`` for a resolved data config (``resolve_data_config``)."""
        size = _pair(cfg["input_size"])
        crop_pct, mode = float(cfg.get("crop_pct") or 0.875), cfg.get("crop_mode") or "center"
        scale = (math.floor(size[0] / crop_pct), math.floor(size[1] / crop_pct))
        if mode == "squash":
            return cls(size, scale, cfg["interpolation"], cfg["mean"], cfg["std"])
        if mode != "center" or scale[0] != scale[1]:
            raise SageError(f"timm crop_mode {mode!r} with input size {size} is not supported: use a square crop")
        return cls(size, scale[0], cfg["interpolation"], cfg["mean"], cfg["std"])

    @classmethod
    def from_open_clip(cls, pp: dict) -> Preprocess:
        """open_clip's ``image_transform(is_train=False)`` for a model's ``visual.preprocess_cfg``."""
        size, mode = _pair(pp["size"]), pp.get("resize_mode") or "shortest"
        if mode == "squash":
            return cls(size, size, pp.get("interpolation") or "bicubic", pp["mean"], pp["std"])
        if mode != "shortest" or size[0] != size[1]:
            raise SageError(f"open_clip resize_mode {mode!r} with size {size} is not supported: use 'shortest'")
        return cls(size, size[0], pp.get("interpolation") or "bicubic", pp["mean"], pp["std"])

    def forward(self, images01: Tensor) -> Tensor:
        from torchvision.transforms.v2 import functional as TF

        resize = [self.resize] if isinstance(self.resize, int) else list(self.resize)
        x = TF.resize(images01.float(), resize, interpolation=self.interpolation, antialias=True)
        x = TF.center_crop(x, list(self.size))
        return (x - self.mean) / self.std


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    return (size[-2], size[-1])


class EnsembleMember(nn.Module):
    """One frozen classifier of the discriminator D.

    Subclasses set ``class_names`` and implement ``logits``. The member is always in eval mode
    (``train()`` is a no-op) and its parameters never require grad.

    A member may have reject outputs after its classes (``reject_names``, e.g. ShapesWorld's ``none``: an empty
    field, a blob, fragments): they take part in its softmax and top-k, so an image it rejects has every class
    outside its top-k, but they are never a search's class.

    Shape:
        - images01: :math:`(B, 3, H, W)` in [0, 1], any H and W.
        - output: :math:`(B, C + R)` logits, C = ``num_classes``, R = ``len(reject_names)``.
    """

    class_names: list[str]
    reject_names: list[str] = []  # outputs after the classes that are no class ("none": nothing of the kind)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def output_names(self) -> list[str]:
        """Names of the logits' columns: the classes, then the reject outputs."""
        return [*self.class_names, *self.reject_names]

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

    Any ``timm`` model name. Preprocessing is the model's own eval transform (``resolve_data_config``:
    antialiased resize of the shortest edge to input/crop_pct in its interpolation, centre crop, its
    mean/std; :class:`Preprocess`), as differentiable tensor ops.
    Local weights: ``checkpoint_path`` to a ``.safetensors`` file or a torch file read with
    ``weights_only=True``.

    Args:
        model_name: timm model name, e.g. ``"convnext_base.fb_in22k_ft_in1k"``.
        class_names: names of the model's output classes in order, or ``"imagenet"``.
        pretrained: let timm load its pretrained weights (downloads if not cached).
        checkpoint_path: local state dict for the model (strict load).
        model_kwargs: extra ``timm.create_model`` keyword arguments.
        reject_names: names of the model's outputs after ``class_names`` that are no class (reject outputs).
        data_config: entries that replace timm's resolved data config (e.g. ``{"crop_pct": 1.0}`` for a
            model trained without a crop). A ``pretrained_cfg_overlay`` in ``model_kwargs`` that sets the
            input size but no ``crop_pct`` describes a model trained at that size without a crop (ShapesWorld's
            members): ``crop_pct`` 1.0 then, not the architecture's ImageNet default.

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
        data_config: dict | None = None,
        reject_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        import timm

        self.class_names = class_names_from_spec(class_names)
        self.reject_names = list(reject_names or [])
        outputs = len(self.output_names)
        kwargs = dict(model_kwargs or {})
        kwargs.setdefault("num_classes", outputs)
        if ":" not in model_name and not timm.is_model(model_name):  # hf-hub:/local-dir: go to timm as is
            close = ", ".join(repr(c) for c in closest_names(model_name, timm.list_models())) or "none close"
            raise SageError(f"unknown timm model {model_name!r}: did you mean {close}? (see timm.list_models())")
        self.model_name = model_name
        self.model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
        if checkpoint_path is not None:
            self.model.load_state_dict(_load_state_dict(checkpoint_path), strict=True)
        if self.model.num_classes != outputs:
            raise SageError(
                f"timm model {model_name!r} has {self.model.num_classes} outputs but class_names and reject_names "
                f"name {outputs}; make them match the model's head"
            )
        overlay = kwargs.get("pretrained_cfg_overlay") or {}
        trained = {"crop_pct": 1.0} if "input_size" in overlay and "crop_pct" not in overlay else {}
        self.use_data_config(**{**trained, **(data_config or {})})
        self.freeze()

    def use_data_config(self, **overrides) -> None:
        """Preprocess with timm's resolved data config for this model, ``overrides`` replacing entries."""
        import timm

        cfg = {**timm.data.resolve_data_config({}, model=self.model), **overrides}
        self.preprocess = Preprocess.from_timm(cfg)
        self.input_size = self.preprocess.size

    def logits(self, images01: Tensor) -> Tensor:
        return self.model(self.preprocess(images01).to(self._param_dtype()))


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
    model has one). Preprocessing: open_clip's eval transform for the model's ``preprocess_cfg``
    (antialiased resize of the shortest edge, centre crop, its mean/std; :class:`Preprocess`).

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
        pp = dict(getattr(visual, "preprocess_cfg", None) or {})
        pp.setdefault("size", visual.image_size)
        pp["mean"] = pp.get("mean") or getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        pp["std"] = pp.get("std") or getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.preprocess = Preprocess.from_open_clip(pp)
        self.input_size = self.preprocess.size
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
        x = self.preprocess(images01).to(self._param_dtype())
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
        stretch_contrast: stretch each image's grayscale range to 0..255 before Canny (ours, off by default:
            the paper's Canny has fixed thresholds), so that a faint shape a person still sees keeps its edges;
            the surrogate's gradient is scaled by the same (constant) stretch.

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
        stretch_contrast: bool = False,
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
        self.reject_names = classifier.reject_names
        self.low_threshold = float(low_threshold)
        self.high_threshold = float(high_threshold)
        self.l2_gradient = bool(l2_gradient)
        self.black_on_white = bool(black_on_white)
        self.stretch_contrast = bool(stretch_contrast)
        sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        self.register_buffer("sobel", torch.stack([sobel_x, sobel_x.T]).unsqueeze(1), persistent=False)
        self.register_buffer("gray_weights", torch.tensor(_GRAY_WEIGHTS).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    @staticmethod
    def _u8(images01: Tensor) -> np.ndarray:
        u8 = (images01.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
        return u8.permute(0, 2, 3, 1).cpu().numpy()

    def canny(self, images01: Tensor) -> Tensor:
        """Exact ``cv2.Canny`` maps as 0/1 floats, :math:`(B, 1, H, W)`, no gradient."""
        _check_images(images01)
        maps = canny_edges(self._u8(images01), self.low_threshold, self.high_threshold, self.l2_gradient,
                           self.stretch_contrast)
        edges = torch.from_numpy(maps).unsqueeze(1)
        return (edges > 0).to(device=images01.device, dtype=images01.dtype)

    def edge_surrogate(self, images01: Tensor) -> Tensor:
        """Differentiable edge strength in [0, 1), :math:`(B, 1, H, W)`: tanh(Sobel magnitude / high)."""
        gray = (images01 * self.gray_weights.to(images01.dtype)).sum(1, keepdim=True) * 255
        if self.stretch_contrast:  # the forward's stretch, held constant
            grays = [cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY) for img in self._u8(images01)]
            shift, scale = torch.tensor([stretch_of(g) for g in grays], dtype=gray.dtype, device=gray.device).T
            gray = (gray - shift.view(-1, 1, 1, 1)) * scale.view(-1, 1, 1, 1)
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
