"""benchmarks/word_position.py (issue 20 probe): the target's word is placed where asked, on the other shapes only."""

from __future__ import annotations

from helpers import load_benchmark

from sage_lightning.shapesworld.generator import SHAPES

word_position = load_benchmark("word_position.py", "word_position")


def test_the_word_sits_before_or_after_the_class_word_and_the_seeds_are_paired():
    before = word_position.prompts("star", "before", 2, 100)
    after = word_position.prompts("star", "after", 2, 100)
    plain = word_position.prompts("star", "none", 2, 100)
    assert len(before) == len(after) == len(plain) == (len(SHAPES) - 1) * len(word_position.TEMPLATES) * 2
    assert "star" not in {s for s, _, _ in before}
    assert ("circle", "a drawing of a star circle") in {(s, p) for s, p, _ in before}
    assert ("circle", "a drawing of a circle star") in {(s, p) for s, p, _ in after}
    assert ("circle", "a drawing of a circle") in {(s, p) for s, p, _ in plain}
    assert [seed for *_, seed in before] == [seed for *_, seed in after] == [seed for *_, seed in plain]
    assert len({seed for *_, seed in before}) == len(before) // len(word_position.TEMPLATES)
