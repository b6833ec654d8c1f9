"""Other model families' loaders (issue 23): a family (``sage_lightning.flow_models``: SD3 / FLUX) registers a
``(load, load_scheduler)`` pair here when imported, and :func:`~sage_lightning.models.load_diffusion` /
:func:`~sage_lightning.models.load_scheduler` ask each in turn before the UNet families; each returns None for a
source that is not its own. A registry, so that the family's modules can use this package's helpers without an
import cycle; ``sage_lightning.models`` imports the families it ships at its end."""

from __future__ import annotations

from collections.abc import Callable

FAMILY_LOADERS: list[tuple[Callable, Callable]] = []
