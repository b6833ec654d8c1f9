"""sage-lightning: SAGE adversarial search for failures of text-to-image diffusion models.

Liu, Kortylewski, Bai, Bai, Yuille, "Intriguing Properties of Text-guided Diffusion Models" (ICLR 2024).
"""

from sage_lightning import flow_models  # noqa: F401  (registers SD3 / FLUX with loading.load_diffusion)
from sage_lightning.errors import SageError

__all__ = ["SageError"]
__version__ = "0.1.0"
