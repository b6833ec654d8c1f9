"""setup.cfg holds the metadata; this file adds what a .cfg cannot compute.

The repository keeps ``callbacks/``, ``datamodules/`` and ``configs/`` at its top; the wheel installs them
inside the package as ``sage_lightning.callbacks``, ``sage_lightning.datamodules`` and
``sage_lightning/configs/`` (the YAML files, as package data), so site-packages gets no top-level package with
a generic name and ``sage fit --config latent_search`` finds the shipped configs. In a source checkout,
``sage_lightning/_checkout.py`` gives the two packages the same names.
"""

from setuptools import find_packages, setup

INSIDE = {
    "sage_lightning.callbacks": "callbacks",
    "sage_lightning.datamodules": "datamodules",
    "sage_lightning.configs": "configs",
}


def packages() -> list[str]:
    """``sage_lightning`` and its subpackages, then the folders installed inside it and their subpackages."""
    found = find_packages(include=["sage_lightning", "sage_lightning.*"])
    for name, folder in INSIDE.items():
        found += [name, *(f"{name}.{sub}" for sub in find_packages(folder))]
    return found


setup(packages=packages(), package_dir=INSIDE)
