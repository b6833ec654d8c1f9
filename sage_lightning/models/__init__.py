"""Where weights come from: the one door to model weights (diffusion models, the candidate LM, CLIP, default
discriminators). Everything returns plain diffusers / transformers objects, so a tiny model, a world such as
ShapesWorld and Stable Diffusion go through the same code.

- ``records``: the frozen model records (:class:`DiffusionModel`, :class:`DiffusionXLModel`).
- ``tokenizer``: the CLIP BPE tokenizer, built offline.
- ``tiny``: the tiny random stacks.
- ``sources``: where a source name points (a world, a folder, a hub id).
- ``schedulers``: scheduler families and a model's own scheduler.
- ``pipelines`` / ``lm``: loading a diffusion model / the candidate language model.
- ``ensembles``: the default discriminator of a source.
- ``families``: other model families' loaders (``sage_lightning.flow_models``: SD3 / FLUX) register here.
- ``clip_score``: CLIP for the CLIP score and the failure-type analysis.

Worlds (``sage_lightning.worlds``) sit above this package: it reaches them by name, never by import.
"""

from sage_lightning.models.clip_score import load_clip
from sage_lightning.models.ensembles import default_ensemble, tiny_ensemble
from sage_lightning.models.lm import load_causal_lm
from sage_lightning.models.pipelines import DTYPES, load_diffusion
from sage_lightning.models.records import DiffusionModel, DiffusionXLModel
from sage_lightning.models.schedulers import SCHEDULERS, check_scheduler, load_scheduler, make_scheduler
from sage_lightning.models.sources import check_lm_source, check_source
from sage_lightning.models.tiny import TINY_SOURCES, build_tiny, build_tiny_xl, tiny_scheduler, tiny_xl_scheduler
from sage_lightning.models.tokenizer import clip_tokenizer, write_clip_bpe_files

__all__ = [
    "DTYPES",
    "SCHEDULERS",
    "TINY_SOURCES",
    "DiffusionModel",
    "DiffusionXLModel",
    "build_tiny",
    "build_tiny_xl",
    "check_lm_source",
    "check_scheduler",
    "check_source",
    "clip_tokenizer",
    "default_ensemble",
    "load_causal_lm",
    "load_clip",
    "load_diffusion",
    "load_scheduler",
    "make_scheduler",
    "tiny_ensemble",
    "tiny_scheduler",
    "tiny_xl_scheduler",
    "write_clip_bpe_files",
]

# The families this package ships beside the UNet models register their loaders (models.families) on import.
from sage_lightning import flow_models  # noqa: E402, F401  (SD3 / FLUX)
