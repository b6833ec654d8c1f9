"""The model records: the frozen parts of a latent text-to-image model that SAGE differentiates through.

Plain diffusers / transformers modules held together, so a tiny model, a world and Stable Diffusion (1.x or XL)
go through the same code.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sage_lightning.errors import SageError


@dataclass
class DiffusionModel:
    """The parts of a latent text-to-image model that SAGE differentiates through (all frozen)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: SchedulerMixin
    name: str = "model"
    sets_begin_index = False  # class attribute: the pipeline's loop calls ``scheduler.set_begin_index(0)``

    def components(self) -> dict:
        """The modules every Stable Diffusion pipeline is built from (shared, not copied)."""
        return {"vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer, "unet": self.unet,
                "scheduler": self.scheduler}

    def pipeline(self) -> StableDiffusionPipeline:
        """The equivalent diffusers pipeline (shares the modules; no safety checker)."""
        return StableDiffusionPipeline(
            **self.components(), safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )

    def modules(self) -> list[torch.nn.Module]:
        """The networks of the record (UNet, VAE, text encoder)."""
        return [self.unet, self.vae, self.text_encoder]

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel (as diffusers' pipelines compute it)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """Side of the images the pipeline makes by default (UNet sample size x VAE scale factor)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def freeze(self) -> DiffusionModel:
        """Every network without gradients and in eval mode; the record itself."""
        for module in self.modules():
            module.requires_grad_(False).eval()
        return self

    def keeps_float32(self, module: torch.nn.Module, dtype: torch.dtype | None) -> bool:
        """Whether ``module`` stays float32 when the model is cast to ``dtype`` (SD 1.x: never)."""
        return False

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> DiffusionModel:
        """Every network moved to ``device`` (and cast to ``dtype``, except those :meth:`keeps_float32`)."""
        for module in self.modules():
            module_dtype = torch.float32 if self.keeps_float32(module, dtype) else dtype
            kwargs = {"device": device} if module_dtype is None else {"device": device, "dtype": module_dtype}
            if module_dtype is not None and not getattr(module, "_keep_in_fp32_modules", None):
                with _diffusers_errors_only():  # diffusers 0.42 warns on every cast, even with no module to keep
                    module.to(**kwargs)
            else:
                module.to(**kwargs)
        return self



@dataclass
class DiffusionXLModel(DiffusionModel):
    """Stable Diffusion XL: a second text encoder (with projection: the pooled text embedding) and the
    UNet's micro-conditioning ``add_time_ids`` = original size, crop top-left, target size (None: the
    image size, as the pipeline's defaults). ``force_zeros_for_empty_prompt``: the unconditional branch
    is all zeros (the pipeline's default when no negative prompt is given)."""

    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None
    force_zeros_for_empty_prompt: bool = True
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    sets_begin_index = True

    def pipeline(self) -> StableDiffusionXLPipeline:
        """The equivalent diffusers pipeline (shares the modules; no watermark)."""
        return StableDiffusionXLPipeline(
            **self.components(), text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt, add_watermarker=False,
        )

    def pipeline_kwargs(self) -> dict:
        """The micro-conditioning as ``StableDiffusionXLPipeline.__call__`` arguments."""
        size = (self.image_size, self.image_size)
        return {
            "original_size": self.original_size or size,
            "crops_coords_top_left": self.crops_coords_top_left,
            "target_size": self.target_size or size,
        }

    def modules(self) -> list[torch.nn.Module]:
        """The networks of the record (UNet, VAE, both text encoders)."""
        return [self.unet, self.vae, self.text_encoder, self.text_encoder_2]

    def keeps_float32(self, module: torch.nn.Module, dtype: torch.dtype | None) -> bool:
        """The VAE stays float32 in a float16 model when its config says ``force_upcast`` (SDXL's VAE overflows
        in float16): what the pipeline does by upcasting it for every decode."""
        return module is self.vae and dtype == torch.float16 and bool(self.vae.config.get("force_upcast", False))

    def add_time_ids(self) -> torch.Tensor:
        """``[1, 6]`` float32: original size, crop top-left, target size (the pipeline's ``_get_add_time_ids``)."""
        kw = self.pipeline_kwargs()
        ids = list(kw["original_size"]) + list(kw["crops_coords_top_left"]) + list(kw["target_size"])
        expected = self.unet.config.projection_class_embeddings_input_dim
        got = self.unet.config.addition_time_embed_dim * len(ids) + self.text_encoder_2.config.projection_dim
        if expected != got:
            raise SageError(f"SDXL UNet expects {expected} added embedding features, the text encoder gives {got}")
        return torch.tensor([ids], dtype=torch.float32)

@contextmanager
def _diffusers_errors_only():
    """Silence diffusers' warnings for the block (its other log levels are restored after)."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)
