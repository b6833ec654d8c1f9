"""ShapesWorld's shipped weights folder (package data) and how a shipped classifier folder becomes a surrogate
member: what the world's plugin hands to the model layer and what its training modules write into."""

from __future__ import annotations

import json
from pathlib import Path

from sage_lightning.surrogate.members import CannyEdgeMember, TimmMember

SHAPESWORLD_DIR = Path(__file__).parent / "weights"


def shapesworld_member(folder: Path) -> TimmMember | CannyEdgeMember:
    """A shipped ShapesWorld classifier folder (``config.json`` + ``model.safetensors``) as a surrogate member:
    ``TimmMember``, wrapped in ``CannyEdgeMember`` for the edge classifier."""
    cfg = json.loads((folder / "config.json").read_text())
    member = TimmMember(cfg["model_name"], list(cfg["class_names"]), checkpoint_path=str(folder / "model.safetensors"),
                        model_kwargs=cfg["model_kwargs"], reject_names=cfg.get("reject_names"))
    if cfg["input"] == "canny":
        c = cfg["canny"]
        return CannyEdgeMember(member, c["low_threshold"], c["high_threshold"], c["l2_gradient"], c["black_on_white"],
                               c.get("stretch_contrast", False))
    return member
