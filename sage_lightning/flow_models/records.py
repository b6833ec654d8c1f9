"""Records of the flow-matching transformers SAGE differentiates through: Stable Diffusion 3 and FLUX.

Each holds the frozen modules of its diffusers pipeline, shares them with that pipeline (:meth:`pipeline`) and
encodes prompts exactly as the pipeline's ``encode_prompt`` does, as an :class:`~sage_lightning.text.XLConditioning`
(``hidden``: the transformer's ``encoder_hidden_states``; ``pooled``: its ``pooled_projections``).

* SD3: two CLIP text encoders with projection (penultimate hidden states side by side, zero-padded to the T5
  width, then the T5 states after them along the sequence; pooled: both projections side by side) and a T5.
* FLUX: one CLIP (its pooled output only) and a T5 (the hidden states).

The VAE's ``scaling_factor`` and ``shift_factor`` turn a latent into the decoder's input:
``latent / scaling_factor + shift_factor`` (:meth:`FlowModel.vae_input`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

from sage_lightning.models.records import DiffusionModel
from sage_lightning.text import XLConditioning


@dataclass
class FlowModel(ABC):
    """The parts of a flow-matching text-to-image transformer (all frozen). ``max_sequence_length``: T5 tokens per
    prompt (the pipelines' default: SD3 256, FLUX 512)."""

    transformer: SD3Transformer2DModel | FluxTransformer2DModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel | CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    text_encoder_2: torch.nn.Module
    tokenizer_2: object
    scheduler: FlowMatchEulerDiscreteScheduler
    name: str = "model"
    max_sequence_length: int = 256
    sets_begin_index = True  # the loop calls ``scheduler.set_begin_index(0)`` (as FluxPipeline does)
    packs_latents = False  # FLUX: the transformer reads 2x2 patches of the latent as tokens

    # Casting and freezing are the same as for a UNet model: every module in ``modules()``, none kept float32.
    freeze = DiffusionModel.freeze
    to = DiffusionModel.to

    def keeps_float32(self, module: torch.nn.Module, dtype: torch.dtype | None) -> bool:
        return False

    def modules(self) -> list[torch.nn.Module]:
        return [self.transformer, self.vae, self.text_encoder, self.text_encoder_2]

    def components(self) -> dict:
        return {"transformer": self.transformer, "vae": self.vae, "scheduler": self.scheduler,
                "text_encoder": self.text_encoder, "tokenizer": self.tokenizer,
                "text_encoder_2": self.text_encoder_2, "tokenizer_2": self.tokenizer_2}

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel (as the pipelines compute it)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def image_size(self) -> int:
        """Side of the images the pipeline makes by default (transformer sample size x VAE scale factor)."""
        return int(self.transformer.config.sample_size) * self.vae_scale_factor

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """``(C, h, w)`` of the initial latent for an image of ``height`` x ``width`` (default: ``image_size``)."""
        factor = self.vae_scale_factor * (2 if self.packs_latents else 1)
        h, w = (height or self.image_size) // factor, (width or self.image_size) // factor
        scale = 2 if self.packs_latents else 1
        return self.latent_channels, h * scale, w * scale

    def vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        """The decoder's input for denoised ``latents``, as the pipelines unscale and shift them."""
        config = self.vae.config
        return latents / config.scaling_factor + (config.shift_factor or 0.0)

    @abstractmethod
    def text_streams(self) -> list[tuple[object, torch.nn.Module, int | None]]:
        """``(tokenizer, text encoder, max length or None: the tokenizer's)`` of each text stream, T5 last."""

    @abstractmethod
    def assemble(self, outputs: Sequence) -> XLConditioning:
        """The conditioning from each stream's encoder output (``output_hidden_states=True``), put together as the
        pipeline's ``encode_prompt`` does."""

    @abstractmethod
    def encode(self, prompts: Sequence[str]) -> XLConditioning:
        """``prompts`` encoded as the pipeline's ``encode_prompt`` does (differentiable in the encoders)."""

    def unconditional(self) -> XLConditioning:
        """The negative branch of classifier-free guidance: the empty prompt (the pipelines' default)."""
        return self.encode([""])


@dataclass
class SD3Model(FlowModel):
    """Stable Diffusion 3 / 3.5: ``text_encoder``, ``text_encoder_2`` CLIP with projection, ``text_encoder_3`` T5."""

    text_encoder_3: T5EncoderModel | None = None
    tokenizer_3: object = None

    def modules(self) -> list[torch.nn.Module]:
        return [*super().modules(), self.text_encoder_3]

    def text_streams(self) -> list[tuple[object, torch.nn.Module, int | None]]:
        """CLIP-L, CLIP-G (77 tokens each) and T5 (``max_sequence_length``)."""
        clip_l, clip_g = (self.tokenizer, self.text_encoder, None), (self.tokenizer_2, self.text_encoder_2, None)
        return [clip_l, clip_g, (self.tokenizer_3, self.text_encoder_3, self.max_sequence_length)]

    def assemble(self, outputs: Sequence) -> XLConditioning:
        """Both CLIPs' penultimate states side by side, zero-padded to T5's width, then T5's states along the
        sequence; pooled: both projections side by side (``StableDiffusion3Pipeline.encode_prompt``)."""
        device = self.transformer.device
        clip = [out.hidden_states[-2].to(dtype=self.text_encoder.dtype, device=device) for out in outputs[:2]]
        t5 = outputs[2][0].to(dtype=self.text_encoder_3.dtype, device=device)
        clip = torch.nn.functional.pad(torch.cat(clip, dim=-1), (0, t5.shape[-1] - sum(c.shape[-1] for c in clip)))
        return XLConditioning(torch.cat([clip, t5], dim=-2), torch.cat([outputs[0][0], outputs[1][0]], dim=-1))

    def pipeline(self) -> StableDiffusion3Pipeline:
        """The equivalent diffusers pipeline (shares the modules)."""
        return StableDiffusion3Pipeline(
            **self.components(), text_encoder_3=self.text_encoder_3, tokenizer_3=self.tokenizer_3
        )

    def encode(self, prompts: Sequence[str]) -> XLConditioning:
        hidden, _, pooled, _ = self.pipeline().encode_prompt(
            list(prompts), prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length, device=self.transformer.device,
        )
        return XLConditioning(hidden, pooled)


@dataclass
class FluxModel(FlowModel):
    """FLUX.1 (dev: a guidance embedding, ``transformer.config.guidance_embeds``; schnell: none)."""

    max_sequence_length: int = 512
    packs_latents = True

    @property
    def image_size(self) -> int:
        """The VAE's sample size (FLUX's: 1024, what FluxPipeline's default 128 x scale factor 8 gives)."""
        return int(self.vae.config.sample_size)

    def text_streams(self) -> list[tuple[object, torch.nn.Module, int | None]]:
        """CLIP (77 tokens) and T5 (``max_sequence_length``)."""
        return [(self.tokenizer, self.text_encoder, None),
                (self.tokenizer_2, self.text_encoder_2, self.max_sequence_length)]

    def assemble(self, outputs: Sequence) -> XLConditioning:
        """T5's last hidden states; pooled: CLIP's pooled output (``FluxPipeline.encode_prompt``)."""
        device = self.transformer.device
        pooled = outputs[0].pooler_output.to(dtype=self.text_encoder.dtype, device=device)
        return XLConditioning(outputs[1][0].to(dtype=self.text_encoder_2.dtype, device=device), pooled)

    def pipeline(self) -> FluxPipeline:
        """The equivalent diffusers pipeline (shares the modules; no IP-adapter image encoder)."""
        return FluxPipeline(**self.components(), image_encoder=None, feature_extractor=None)

    def encode(self, prompts: Sequence[str]) -> XLConditioning:
        hidden, pooled, _ = self.pipeline().encode_prompt(
            list(prompts), prompt_2=None, max_sequence_length=self.max_sequence_length,
            device=self.transformer.device,
        )
        return XLConditioning(hidden, pooled)
