"""Random-weight diffusion stacks at real sizes for the benchmarks (no download): Stable Diffusion 1.5's and
XL base 1.0's architectures from their published configs, a "small" stack between the tiny test stack and
SD 1.5, and the tiny stack itself. Built on whatever ``torch.device`` is current (``meta`` for estimates)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sage_lightning.models import DiffusionModel, DiffusionXLModel, build_tiny, clip_tokenizer


def _ddim() -> DDIMScheduler:
    """Stable Diffusion 1.x's scheduler settings (as ``build_tiny``); its tables on the CPU, also when the
    stack is built on the meta device (``--construct-only``)."""
    with torch.device("cpu"):
        return DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
            set_alpha_to_one=False, steps_offset=1,
        )


def _euler() -> EulerDiscreteScheduler:
    """Stable Diffusion XL base's scheduler (EulerDiscrete, "leading" spacing), its tables on the CPU."""
    with torch.device("cpu"):
        return EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
            timestep_spacing="leading",
        )


def _clip_text(
    hidden: int, layers: int, heads: int, intermediate: int, act: str = "quick_gelu", cls: type = CLIPTextModel
) -> CLIPTextModel:
    return cls(
        CLIPTextConfig(
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=hidden,
            intermediate_size=intermediate, num_attention_heads=heads, num_hidden_layers=layers,
            vocab_size=49408, max_position_embeddings=77, hidden_act=act, projection_dim=hidden,
        )
    )


def _sd_vae(sample_size: int, **config) -> AutoencoderKL:
    """Stable Diffusion's x8 VAE (1.x, 2.x and XL share the architecture)."""
    return AutoencoderKL(
        block_out_channels=[128, 256, 512, 512], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=2, sample_size=sample_size, norm_num_groups=32, **config,
    )


def build_small(seed: int = 0) -> DiffusionModel:
    """A larger random stack: UNet (64, 128, 256) on 32x32x4 latents, VAE x8 -> 256 px images."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128, 256), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64, 128, 128], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=1, sample_size=256, norm_num_groups=32,
    )
    text_encoder = _clip_text(hidden=128, layers=4, heads=4, intermediate=512)
    return DiffusionModel(unet, vae, text_encoder, clip_tokenizer(), _ddim(), name="small").freeze()


def build_sd15(seed: int = 0) -> DiffusionModel:
    """Stable Diffusion 1.5's architecture with random weights (512 px, 64x64x4 latents)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)  # defaults = SD 1.x UNet
    text_encoder = _clip_text(hidden=768, layers=12, heads=12, intermediate=3072)
    return DiffusionModel(unet, _sd_vae(512), text_encoder, clip_tokenizer(), _ddim(), name="sd15").freeze()


def build_sdxl(seed: int = 0) -> DiffusionXLModel:
    """Stable Diffusion XL base 1.0's architecture with random weights (1024 px, 128x128x4 latents): the
    configs of stabilityai/stable-diffusion-xl-base-1.0's unet, vae, text_encoder, text_encoder_2, scheduler."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
        cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,  # 6 * 256 + 1280 (pooled bigG)
    )
    vae = _sd_vae(1024, scaling_factor=0.13025, force_upcast=True)
    text_encoder = _clip_text(hidden=768, layers=12, heads=12, intermediate=3072)
    text_encoder_2 = _clip_text(1280, 32, 20, 5120, act="gelu", cls=CLIPTextModelWithProjection)
    return DiffusionXLModel(
        unet, vae, text_encoder, clip_tokenizer(), _euler(), name="sdxl",
        text_encoder_2=text_encoder_2, tokenizer_2=clip_tokenizer(pad_token="!"),
    ).freeze()


STACKS: dict[str, Callable[[], DiffusionModel]] = {
    "tiny": build_tiny, "small": build_small, "sd15": build_sd15, "sdxl": build_sdxl,
}
