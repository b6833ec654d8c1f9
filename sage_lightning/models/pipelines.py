"""Loading a text-to-image latent diffusion model, frozen: a world, a tiny stack, a local folder or a hub id."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from sage_lightning.errors import SageError
from sage_lightning.models.families import FAMILY_LOADERS
from sage_lightning.models.records import DiffusionModel, DiffusionXLModel
from sage_lightning.models.schedulers import check_scheduler, make_scheduler
from sage_lightning.models.sources import check_source, load_error
from sage_lightning.models.tiny import TINY_SOURCES

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A dtype name (see ``DTYPES``) or a torch dtype as a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise SageError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_diffusion(
    source: str = "shapesworld",
    *,
    scheduler: str | None = "ddim",
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    local_files_only: bool = False,
    seed: int = 0,
) -> DiffusionModel:
    """Load a text-to-image latent diffusion model, frozen.

    ``source``: ``"shapesworld"`` (the embedded default; a world by its name), ``"tiny"`` / ``"tiny-xl"`` (random
    weights, ``seed``), a local folder saved by ``save_pretrained`` of a ``StableDiffusionPipeline`` or a
    ``StableDiffusionXLPipeline``, or a hub id such as ``"runwayml/stable-diffusion-v1-5"`` or
    ``"stabilityai/stable-diffusion-xl-base-1.0"``; an SD3 / FLUX source goes to its family's loader
    (:mod:`sage_lightning.models.families`).
    ``scheduler`` replaces the pipeline's scheduler by that family (None keeps it).
    """
    torch_dtype = _resolve_dtype(dtype)
    for family_load, _ in FAMILY_LOADERS:  # each returns None for a source not its own (a world, a tiny UNet)
        family_model = family_load(source, scheduler=scheduler, dtype=dtype, device=device,  # SD3 / FLUX first
                                   local_files_only=local_files_only, seed=seed)
        if family_model is not None:
            return family_model
    if source in TINY_SOURCES:
        model = TINY_SOURCES[source](seed=seed)
    else:
        model = _load_pipeline(source, local_files_only)
    if scheduler is not None:
        model.scheduler = make_scheduler(scheduler, model.scheduler.config)
    check_scheduler(model.scheduler, source)
    return model.freeze().to(device, None if torch_dtype == torch.float32 else torch_dtype)


def _load_pipeline(source: str, local_files_only: bool) -> DiffusionModel:
    """A ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` folder / hub id (by its model_index.json)."""
    path, is_local = check_source(source)
    where, offline = (str(path) if is_local else source), local_files_only or is_local
    try:
        index = StableDiffusionPipeline.load_config(where, local_files_only=offline)
        if index.get("_class_name") == StableDiffusionXLPipeline.__name__:
            xl = StableDiffusionXLPipeline.from_pretrained(where, local_files_only=offline, add_watermarker=False)
            return DiffusionXLModel(
                xl.unet, xl.vae, xl.text_encoder, xl.tokenizer, xl.scheduler, name=source,
                text_encoder_2=xl.text_encoder_2, tokenizer_2=xl.tokenizer_2,
                force_zeros_for_empty_prompt=bool(xl.config.force_zeros_for_empty_prompt),
            )
        pipe = StableDiffusionPipeline.from_pretrained(
            where, local_files_only=offline, safety_checker=None, requires_safety_checker=False
        )
    except (OSError, ValueError) as err:
        raise load_error("model", source, err) from err
    return DiffusionModel(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, name=source)

