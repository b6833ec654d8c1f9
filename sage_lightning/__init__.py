"""sage-lightning: SAGE adversarial search for failures of text-to-image diffusion models.

Liu, Kortylewski, Bai, Bai, Yuille, "Intriguing Properties of Text-guided Diffusion Models" (ICLR 2024).
"""

from pathlib import Path

from sage_lightning import _checkout
from sage_lightning.errors import SageError

_checkout.install(Path(__file__).resolve().parent)  # a source checkout: callbacks/, datamodules/ as subpackages

__all__ = ["SageError"]
__version__ = "0.1.0"
