"""User-facing errors: one line that names the bad value and the fix."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable


class SageError(ValueError):
    """A mistake in the user's input. The CLI prints its message as one line, without a traceback."""


def closest_names(name: str, known: Iterable[str], n: int = 5) -> list[str]:
    """The known names most similar to ``name`` (for 'did you mean' messages)."""
    return difflib.get_close_matches(name, list(known), n=n, cutoff=0.4)


_PATH = re.compile(r"""^['"(]?[\w.~-]*/[^\s\[\]{}]*$""")  # a file path (maybe quoted): a slash, no brackets
LONGEST_PATH = 4096  # PATH_MAX


def shorten(text: str, longest: int = 80) -> str:
    """``text`` with every run of more than ``longest`` non-blank characters cut to its start and its length.

    A path is kept whole (up to PATH_MAX): the user copies it (a run folder, a checkpoint, a resume command)."""

    def cut(match: re.Match) -> str:
        run = match.group()
        if _PATH.match(run) and len(run) <= LONGEST_PATH:
            return run
        return f"{run[: longest // 2]}...({len(run)} characters)"

    return re.sub(rf"\S{{{longest + 1},}}", cut, text)


_NOISE = ("Subtypes:", "Errors:", "Given value", "Expected a <class 'NoneType'>", "Does not validate against any",
          "Expected a path but")


def one_line(message: str, longest: int = 80) -> str:
    """A multi-line (jsonargparse) error as one line: bookkeeping lines dropped, long values shortened."""
    kept = [line.strip().removeprefix("- ") for line in message.splitlines()]
    kept = [line for line in kept if line and not line.startswith(_NOISE)]
    return shorten(" ".join(" ".join(kept).split()), longest)
