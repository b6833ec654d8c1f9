"""SAGE searches, one LightningModule per file."""

from sage_lightning.searches.base import TargetSearch
from sage_lightning.searches.latent import LatentSearch
from sage_lightning.searches.random_latent import RandomLatentSearch

__all__ = ["LatentSearch", "RandomLatentSearch", "TargetSearch"]
