"""Flow-matching transformers (Stable Diffusion 3 / 3.5, FLUX.1): records, loading, tiny random stacks.

Kept apart from :mod:`sage_lightning.models` (UNet models), which hands SD3 / FLUX sources here through
:func:`load_flow`; the sampler is :mod:`sage_lightning.flow_sampler`.
"""

from sage_lightning.flow_models.load import (
    FLOW_TINY_SOURCES,
    is_flow_source,
    is_tiny_source,
    load_flow,
    load_flow_scheduler,
)
from sage_lightning.flow_models.records import FlowModel, FluxModel, SD3Model
from sage_lightning.flow_models.t5_tokenizer import t5_tokenizer
from sage_lightning.flow_models.tiny import build_tiny_flux, build_tiny_sd3

__all__ = [
    "FLOW_TINY_SOURCES",
    "FlowModel",
    "FluxModel",
    "SD3Model",
    "build_tiny_flux",
    "build_tiny_sd3",
    "is_flow_source",
    "is_tiny_source",
    "load_flow",
    "load_flow_scheduler",
    "t5_tokenizer",
]
