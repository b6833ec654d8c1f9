"""CLIP for the CLIP score and the failure-type analysis: a world's CLIP, a local folder or a hub id, frozen."""

from __future__ import annotations

from pathlib import Path

import torch

from sage_lightning.errors import SageError
from sage_lightning.worlds import find_world


class _FeatureTensors(torch.nn.Module):
    """A ``CLIPModel`` whose ``get_image_features`` / ``get_text_features`` return tensors (with transformers 5
    they return model outputs, where torchmetrics' ``CLIPScore`` expects the projected feature tensors)."""

    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.clip = clip
        self.config = clip.config

    @staticmethod
    def _tensor(out: object) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        """CLIP's projected image features as a tensor."""
        return self._tensor(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        """CLIP's projected text features as a tensor."""
        return self._tensor(self.clip.get_text_features(*args, **kwargs))


def load_clip(model: str = "shapesworld", local_files_only: bool = False) -> tuple[torch.nn.Module, object]:
    """``(model, processor)`` of a frozen CLIP: the CLIP score's model (callbacks/clip_score.py, through
    ``CLIPScore(model_name_or_path=lambda: ...)``) and the failure-type analysis's image features. The model's
    ``get_image_features`` / ``get_text_features`` return the projected feature tensors.

    ``model``: a world's name such as ``"shapesworld"`` (the world's CLIP), a local folder with a ``CLIPModel``
    and its processor (``save_pretrained``), or a hub id such as ``openai/clip-vit-base-patch32``.
    """
    from transformers import CLIPModel, CLIPProcessor

    world = find_world(model)
    source = world.weights / "clip" if world else Path(model).expanduser()
    if world and not (source / "config.json").exists():
        raise SageError(f"{world.title}'s CLIP is missing at {source}: rebuild it with {world.rebuild}")
    name = str(source) if world or source.exists() else model
    local = local_files_only or world is not None or source.exists()
    try:
        clip = CLIPModel.from_pretrained(name, local_files_only=local).eval().requires_grad_(False)
        if world and not (source / "preprocessor_config.json").exists():
            processor = world.clip_processor(source, int(clip.config.vision_config.image_size))
        else:
            processor = CLIPProcessor.from_pretrained(name, local_files_only=local)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise SageError(
            f"cannot load CLIP model {model!r} ({first[:160]}): give 'shapesworld', a folder with a CLIPModel and "
            "its processor, or a hub id"
        ) from err
    return _FeatureTensors(clip), processor
