"""User-facing errors: one line that names the bad value and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SageError(ValueError):
    """A mistake in the user's input. The CLI prints its message as one line, without a traceback."""


def closest_names(name: str, known: Iterable[str], n: int = 5) -> list[str]:
    """The known names most similar to ``name`` (for 'did you mean' messages)."""
    return difflib.get_close_matches(name, list(known), n=n, cutoff=0.4)
