"""What a ShapesWorld caption *says* about its scene: the targets of the text stage.

The text stage trains the text tower so that each attribute a caption names (shape, colour, size, style,
background kind and colour) can be read linearly from its states; an attribute the caption leaves out is
the extra class "not said", and the empty caption (classifier-free guidance's unconditional prompt) says
nothing at all, so its states end up far from every class prompt's.
"""

from __future__ import annotations

import numpy as np
import torch

from sage_lightning.shapesworld.generator import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SIZES,
    STYLE_PHRASES,
    STYLES,
    Scene,
    caption,
    sample_scene,
)

_COLOURS = list(COLOURS)
_SIZES = list(SIZES)
# number of classes per attribute: its values plus "not said" (the last index)
HEADS: dict[str, int] = {
    "shape": len(SHAPES) + 1, "colour": len(_COLOURS) + 1, "size": len(_SIZES) + 1,
    "style": len(STYLES) + 1, "background": len(BACKGROUNDS) + 1, "background_colour": len(_COLOURS) + 1,
}
_STYLE_WORDS = {p.split(" of")[0].split()[-1] for ps in STYLE_PHRASES.values() for p in ps}
_KIND_WORD = {"plain": "plain", "gradient": "gradient", "texture": "textured"}


def labels(scene: Scene, text: str) -> dict[str, int]:
    """Index of each attribute that ``text`` states about ``scene``, or the "not said" index."""
    if text == "":
        return {k: n - 1 for k, n in HEADS.items()}
    obj, _, bg = text.partition(" on ")
    obj_words, bg_words = obj.split(), bg.split()
    said_colour = scene.shape in obj_words and obj_words[obj_words.index(scene.shape) - 1] == scene.colour
    return {
        "shape": scene.shape_id,
        "colour": _COLOURS.index(scene.colour) if said_colour else len(_COLOURS),
        "size": _SIZES.index(scene.size) if scene.size in obj_words else len(_SIZES),
        "style": STYLES.index(scene.style) if _STYLE_WORDS & set(obj_words) else len(STYLES),
        "background": (BACKGROUNDS.index(scene.background) if _KIND_WORD[scene.background] in bg_words
                       else len(BACKGROUNDS)),
        "background_colour": (_COLOURS.index(scene.background_colour) if scene.background_colour in bg_words
                              else len(_COLOURS)),
    }


def caption_batch(n: int, seed: int, empty: float = 0.1) -> tuple[list[str], dict[str, torch.Tensor]]:
    """``n`` seeded captions (a share ``empty`` of them "") and their attribute labels [n] per head."""
    rng = np.random.default_rng(seed)
    texts, rows = [], []
    for _ in range(n):
        scene = sample_scene(rng)
        text = "" if rng.random() < empty else caption(scene, rng)
        texts.append(text)
        rows.append(labels(scene, text))
    return texts, {k: torch.tensor([r[k] for r in rows]) for k in HEADS}
