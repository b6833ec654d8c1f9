"""ShapesWorld as a world (``sage_lightning.worlds``): importing this module registers it, so that the model
layer, the searches and the analyses reach ShapesWorld's weights, default ensemble, judge and synonyms by the
name ``shapesworld`` without importing this package."""

from __future__ import annotations

from pathlib import Path

from sage_lightning.errors import SageError
from sage_lightning.shapesworld.generator import SHAPES
from sage_lightning.shapesworld.shipped import SHAPESWORLD_DIR, shapesworld_member
from sage_lightning.shapesworld.synonyms import SHAPE_SYNONYMS
from sage_lightning.surrogate import ClassifierEnsemble
from sage_lightning.worlds import World, register_world

# The world's D looks at every image in six nuisance views (surrogate/views.py): SAGE must change what each shows.
SHAPESWORLD_VIEWS = ("image", "gbr", "brg", "gray", "blur", "half")


def default_ensemble() -> ClassifierEnsemble:
    """The world's own classifiers, in ``classifiers.NAMES`` order (two timm architectures, the Canny-edge
    member, and the two architectures adversarially trained): the shipped ones of them, in the nuisance views
    ``SHAPESWORLD_VIEWS``, with the surrogate loss over the classes only (``loss_over="classes"``: moving a member
    onto ``none`` does not pay; benchmarks/README.md, issue 19's seventh round)."""
    from sage_lightning.shapesworld.classifiers import NAMES

    folder = SHAPESWORLD_DIR / "classifiers"
    shipped = [name for name in NAMES if (folder / name / "config.json").exists()]
    if not shipped:
        raise SageError(f"ShapesWorld classifiers are missing in {folder}: rebuild them (`sage-shapesworld build`)")
    return ClassifierEnsemble([shapesworld_member(folder / name) for name in shipped], views=SHAPESWORLD_VIEWS,
                              loss_over="classes")


def judge(images: object) -> list[str | None]:
    """The geometric judge's shape name for each image (float ``[N, 3, H, W]`` in [0, 1] or uint8
    ``[N, H, W, 3]``; None where it sees no clean shape)."""
    from sage_lightning.shapesworld.judge import judge_shapes, to_uint8

    return judge_shapes(to_uint8(images))


def clip_processor(folder: Path, image_size: int) -> object:
    """ShapesWorld's CLIP convention (world.pixel_values): 64 px, [0, 1] -> [-1, 1], no crop."""
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    image_processor = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": image_size},
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=CLIPTokenizer.from_pretrained(str(folder)))


WORLD = register_world(World(
    name="shapesworld",
    title="ShapesWorld",
    weights=SHAPESWORLD_DIR,
    rebuild="`sage-shapesworld build`",
    class_names=tuple(SHAPES),
    synonyms=SHAPE_SYNONYMS,
    default_ensemble=default_ensemble,
    judge=judge,
    clip_processor=clip_processor,
))
