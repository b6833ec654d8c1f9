"""Class lists for the discriminator D: ImageNet names and name/index resolution with 'did you mean'."""

from __future__ import annotations

from collections.abc import Sequence

from sage_lightning.errors import SageError, closest_names
from sage_lightning.worlds import all_worlds


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (open_clip's readable names; a fresh list)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def class_synonyms(class_names: Sequence[str]) -> dict[str, list[str]]:
    """Synonyms of each class: for ImageNet-1k (``imagenet_class_names()``), all WordNet lemmas of its synset
    (timm's ``ImageNetInfo``, shipped with timm: "cab" -> cab, hack, taxi, taxicab); for a world's classes (the
    ten shapes of ShapesWorld), the world's own table (``World.synonyms``); none for other lists (there the word
    filter's stem rule and a search's ``synonyms`` setting apply: ``candidates.WordFilter``)."""
    names = list(class_names)
    for world in all_worlds():
        if names == list(world.synonyms):
            return {name: list(world.synonyms[name]) for name in names}
    if names != imagenet_class_names():
        return {name: [] for name in names}
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    synonyms: dict[str, list[str]] = {}
    for i, name in enumerate(names):  # two names occur twice ("missile", "sunglasses"): their lemmas are merged
        words = synonyms.setdefault(name, [])
        words += [lemma for lemma in info.index_to_description(i).split(", ") if lemma != name and lemma not in words]
    return synonyms


def class_names_from_spec(spec: Sequence[str] | str) -> list[str]:
    """A member's ``class_names`` argument as a list: a list of names, or the shorthand ``"imagenet"``."""
    if isinstance(spec, str):
        if spec.lower() in ("imagenet", "imagenet1k", "imagenet-1k"):
            return imagenet_class_names()
        raise SageError(f"unknown class list {spec!r}; give a list of class names or 'imagenet'")
    names = [str(n) for n in spec]
    if not names:
        raise SageError("class_names is empty; give a list of class names or 'imagenet'")
    return names


def resolve_classes(names_or_indices: Sequence[str | int] | str | int, known: Sequence[str]) -> list[int]:
    """Target classes c as indices into ``known``.

    Each entry is an index (int, or a string of digits that is not itself a class name) or a class
    name (exact, else case-insensitive). Unknown or ambiguous names raise :class:`SageError` with
    the closest known names.
    """
    if isinstance(names_or_indices, (str, int)):
        names_or_indices = [names_or_indices]
    known = list(known)
    exact: dict[str, list[int]] = {}
    folded: dict[str, list[int]] = {}
    for i, name in enumerate(known):
        exact.setdefault(name, []).append(i)
        folded.setdefault(name.strip().lower(), []).append(i)

    out: list[int] = []
    for item in names_or_indices:
        if isinstance(item, bool):
            raise SageError(f"class {item!r} is not a name or an index; give a class name or an index")
        if isinstance(item, int):
            if not 0 <= item < len(known):
                raise SageError(f"class index {item} is out of range; use 0..{len(known) - 1}")
            out.append(item)
            continue
        name = str(item)
        hits = exact.get(name) or folded.get(name.strip().lower())
        if hits is None and name.strip().isdigit():
            out.extend(resolve_classes([int(name.strip())], known))
            continue
        if hits is None:
            close = closest_names(name, known) or closest_names(name.lower(), [k.lower() for k in known])
            hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else "no close match;"
            raise SageError(f"unknown class {name!r}; {hint} use a known class name or an index")
        if len(hits) > 1:
            raise SageError(f"class name {name!r} is ambiguous (indices {hits}); pass one of those indices")
        out.append(hits[0])
    return out
