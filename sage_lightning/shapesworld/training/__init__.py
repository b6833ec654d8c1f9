"""Training ShapesWorld's models with Lightning, one module per stage (as ``searches/`` holds one per search).

Stages: ``text`` (CLIP's text tower taught to state each caption's attributes, then frozen), ``clip``
(contrastive tiny CLIP; its vision side against the frozen text tower), ``vae`` (4x AutoencoderKL),
``unet`` (text-conditioned latent diffusion on the frozen text tower and VAE). ``run.train`` runs one stage;
the command line is ``sage_lightning.shapesworld.train`` (``sage-shapesworld train``).
"""

from sage_lightning.shapesworld.training.base import STAGES, WorldModule
from sage_lightning.shapesworld.training.clip import ClipModule
from sage_lightning.shapesworld.training.run import MODULES, RunOptions, train
from sage_lightning.shapesworld.training.text import TextModule
from sage_lightning.shapesworld.training.unet import UnetModule
from sage_lightning.shapesworld.training.vae import VaeModule

__all__ = ["MODULES", "STAGES", "ClipModule", "RunOptions", "TextModule", "UnetModule", "VaeModule", "WorldModule",
           "train"]
