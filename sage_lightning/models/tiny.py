"""The tiny stacks: Stable-Diffusion- and SDXL-shaped models with random, seeded weights (debugging and tests),
as diffusers' ``get_dummy_components``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sage_lightning.models.records import DiffusionModel, DiffusionXLModel
from sage_lightning.models.tokenizer import clip_tokenizer


def _test_vae(seed: int, sample_size: int) -> AutoencoderKL:
    """diffusers' test VAE (32, 64): scale factor 2, seeded."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=sample_size,
        norm_num_groups=32,
    )


def _test_clip_config(hidden: int, layers: int, **extra) -> CLIPTextConfig:
    """diffusers' test CLIP text config on the real 49408-token vocabulary (EOS 49407)."""
    return CLIPTextConfig(
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_size=hidden,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=layers,
        vocab_size=49408,
        max_position_embeddings=77,
        **extra,
    )


def _tiny_unet(seed: int, **config) -> UNet2DConditionModel:
    """diffusers' test UNet on 32x32x4 latents (one plain and one cross-attention block), seeded."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        **config,
    )


def build_tiny(seed: int = 0, prediction_type: str = "epsilon", hidden: int = 32) -> DiffusionModel:
    """A Stable-Diffusion-shaped stack with random weights (as diffusers' ``get_dummy_components``).

    UNet 32x32x4 latents, a VAE with scale factor 2 (64 px images), a 2-layer CLIP text encoder on
    the real 49408-token vocabulary, DDIM. Seeded: the same seed gives the same weights.
    """
    unet = _tiny_unet(seed, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=hidden,
                      norm_num_groups=32)
    vae = _test_vae(seed, sample_size=64)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_test_clip_config(hidden, layers=2))
    scheduler = tiny_scheduler(prediction_type)
    return DiffusionModel(unet, vae, text_encoder, clip_tokenizer(), scheduler, name="tiny").freeze()


def build_tiny_xl(seed: int = 0) -> DiffusionXLModel:
    """A Stable-Diffusion-XL-shaped stack with random weights, as diffusers' SDXL ``get_dummy_components``.

    UNet (2, 4) with ``text_time`` added conditioning on 32x32x4 latents, a VAE with scale factor 2 (64 px),
    two 5-layer CLIP text encoders (the second with a projection: the pooled embedding) on the real
    49408-token vocabulary, EulerDiscrete with "leading" spacing. Seeded: the same seed, the same weights.
    """
    unet = _tiny_unet(
        seed,
        block_out_channels=(2, 4),
        layers_per_block=2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 + 32
        cross_attention_dim=64,  # 32 + 32: both encoders' hidden states side by side
        norm_num_groups=1,
    )
    vae = _test_vae(seed, sample_size=128)
    config = _test_clip_config(32, layers=5, hidden_act="gelu", projection_dim=32)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(config)
    text_encoder_2 = CLIPTextModelWithProjection(config)
    return DiffusionXLModel(
        unet, vae, text_encoder, clip_tokenizer(), tiny_xl_scheduler(), name="tiny-xl",
        text_encoder_2=text_encoder_2, tokenizer_2=clip_tokenizer(pad_token="!"),
    ).freeze()


def tiny_xl_scheduler() -> EulerDiscreteScheduler:
    """SDXL's default scheduler family: Euler discrete, "leading" spacing (as diffusers' SDXL tests)."""
    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear", timestep_spacing="leading"
    )


def tiny_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """The tiny stack's DDIM (Stable Diffusion 1.x's betas, as diffusers' tests)."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type=prediction_type,
        steps_offset=1,
    )


# Built-in sources with random weights (debugging and tests): name -> builder(seed=...), and their own schedulers.
TINY_SOURCES: dict[str, Callable[..., DiffusionModel]] = {"tiny": build_tiny, "tiny-xl": build_tiny_xl}
TINY_SCHEDULERS: dict[str, Callable[[], SchedulerMixin]] = {"tiny": tiny_scheduler, "tiny-xl": tiny_xl_scheduler}
