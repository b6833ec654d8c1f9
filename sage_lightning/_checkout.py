"""``sage_lightning.callbacks`` and ``sage_lightning.datamodules`` in a source checkout.

The repository keeps ``callbacks/`` and ``datamodules/`` at its top, beside ``sage_lightning/`` (the layout the
project was asked for). The wheel installs them inside the package (``setup.py``'s ``package_dir``), so
site-packages gets no top-level ``callbacks`` or ``datamodules``, names that other projects use too, and all
code imports them by those installed names.

A checkout run as it is (``PYTHONPATH=<checkout>``, ``python -m ...`` from its root, or an editable install)
has no such subfolders inside ``sage_lightning/``. There :func:`install` puts a finder first on
``sys.meta_path`` that answers for exactly those two names with the sibling folders of the ``sage_lightning``
that was imported (``spec_from_file_location`` with ``submodule_search_locations``), so their submodules are
then found the ordinary way through the package's ``__path__``. Why this and not something simpler:

* first on ``sys.meta_path``: the folders always come from the same checkout as ``sage_lightning`` itself,
  even when an editable install of another checkout (whose finder maps the same names) sits in the same
  environment;
* a finder, not an import at start-up: nothing is executed until the names are asked for, so importing
  ``sage_lightning`` stays light and the callbacks (which import the searches) cause no import cycle;
* only those two names, and only in a checkout (``setup.cfg`` beside the package and no ``callbacks/`` inside
  it): an installed wheel never reaches this code's finder.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

SIBLINGS = ("callbacks", "datamodules")


class SiblingFolders(importlib.abc.MetaPathFinder):
    """Finds ``sage_lightning.<name>`` in ``<checkout>/<name>/`` for the names it was given."""

    def __init__(self, folders: dict[str, Path]) -> None:
        self.folders = folders

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


def checkout_folders(package_dir: Path) -> dict[str, Path]:
    """``{"sage_lightning.callbacks": <checkout>/callbacks, ...}`` when ``package_dir`` is a checkout's package
    folder; ``{}`` for an installed package."""
    root = package_dir.parent
    if not (root / "setup.cfg").is_file():
        return {}
    return {
        f"{package_dir.name}.{name}": root / name
        for name in SIBLINGS
        if not (package_dir / name).exists() and (root / name / "__init__.py").is_file()
    }


def install(package_dir: Path) -> None:
    """Put the finder for a checkout's sibling folders first on ``sys.meta_path`` (once; nothing if installed)."""
    folders = checkout_folders(package_dir)
    if folders and not any(isinstance(finder, SiblingFolders) for finder in sys.meta_path):
        sys.meta_path.insert(0, SiblingFolders(folders))
