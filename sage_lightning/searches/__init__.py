"""SAGE searches, one LightningModule per file."""

from sage_lightning.searches.base import TargetSearch
from sage_lightning.searches.latent import LatentSearch
from sage_lightning.searches.prompt import PromptSearch
from sage_lightning.searches.random_latent import RandomLatentSearch
from sage_lightning.searches.random_perturbation import RandomPerturbationSearch
from sage_lightning.searches.random_prompt import RandomWordSearch
from sage_lightning.searches.random_token import RandomTokenSearch
from sage_lightning.searches.universal_token import UniversalTokenSearch

__all__ = [
    "LatentSearch", "PromptSearch", "RandomLatentSearch", "RandomPerturbationSearch", "RandomTokenSearch",
    "RandomWordSearch", "TargetSearch", "UniversalTokenSearch",
]
