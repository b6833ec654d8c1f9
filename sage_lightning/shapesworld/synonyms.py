"""Synonyms of ShapesWorld's shape names: the words a prompt search must never append (METHOD.md,
"Prompt-space search": the paper excludes the class's WordNet synonyms; a prompt that names a shape, in any
words, is not a failure of the model). Each entry: other nouns for the shape, its adjectives, and the
objects a caption would name for it ("moon" for a crescent). Plurals (+s, +es) are added by the word filter."""

from __future__ import annotations

SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circular", "round", "disc", "disk", "dot", "oval", "ellipse", "sphere", "ball", "orb", "spot"),
    "square": ("squared", "box", "cube", "block", "rectangle", "rectangular", "quadrilateral", "tile", "quad"),
    "triangle": ("triangular", "pyramid", "wedge", "delta", "trigon", "cone"),
    "star": ("starry", "stellar", "pentagram", "asterisk", "starburst", "starfish", "sparkle"),
    "heart": ("hearted", "valentine", "cardioid", "love"),
    "cross": ("plus", "crucifix", "cruciform", "crossed", "x"),
    "hexagon": ("hexagonal", "hex", "honeycomb", "polygon"),
    "ring": ("annulus", "annular", "donut", "doughnut", "hoop", "loop", "halo", "circlet", "band", "torus"),
    "crescent": ("moon", "lunar", "sickle", "croissant", "banana"),
    "arrow": ("arrowhead", "pointer", "chevron", "dart", "arrows"),
}
