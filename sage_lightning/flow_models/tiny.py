"""Tiny random SD3 and FLUX stacks, built offline as diffusers' own pipeline tests build theirs.

The configs follow ``get_dummy_components`` of diffusers' ``tests/pipelines/stable_diffusion_3`` and
``tests/pipelines/flux``, with three changes so that the tiny stacks exercise what the real models do: the CLIP
encoders read the real 49408-token CLIP BPE (:func:`sage_lightning.models.clip_tokenizer`), the T5 config is
written here by hand and reads the offline :func:`~sage_lightning.flow_models.t5_tokenizer.t5_tokenizer` (the
tests take both from the hub), and the VAE has two blocks (scale factor 2) with SD3's transformer on 2x2 patches
as SD3's real one. Schedulers carry the real models' configs (SD3: static shift 3; FLUX-dev: dynamic shifting).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from sage_lightning.flow_models.records import FluxModel, SD3Model
from sage_lightning.flow_models.t5_tokenizer import t5_tokenizer
from sage_lightning.models.tiny import _test_clip_config
from sage_lightning.models.tokenizer import clip_tokenizer

TINY_MAX_SEQUENCE_LENGTH = 32  # T5 tokens per prompt in the tiny stacks (the real pipelines: 256 / 512)


def sd3_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Stable Diffusion 3 medium's scheduler config: static shift 3."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler config: shift by the image-size dependent mu."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )


def tiny_t5_config(d_model: int) -> T5Config:
    """A 2-layer T5 encoder (hf-internal-testing/tiny-random-t5's shape, written by hand) on the offline
    tokenizer's vocabulary; ``d_model`` must equal the transformer's ``joint_attention_dim``."""
    return T5Config(
        vocab_size=len(t5_tokenizer()), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, layer_norm_epsilon=1e-6, feed_forward_proj="relu",
        is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )


def _tiny_vae(seed: int, latent_channels: int, scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """diffusers' SD3 / FLUX test VAE with a second block (scale factor 2), no quant convs, seeded."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=scaling_factor, shift_factor=shift_factor,
    )


def _tiny_t5_tokenizer():
    """The offline T5 tokenizer, its ``model_max_length`` the tiny stacks' sequence length (a saved tiny folder
    reloads with it)."""
    return t5_tokenizer(max_length=TINY_MAX_SEQUENCE_LENGTH)


def _seeded(seed: int, build):
    torch.manual_seed(seed)
    return build()


def build_tiny_sd3(seed: int = 0) -> SD3Model:
    """An SD3-shaped stack with random weights: a 1-layer SD3 transformer on 16x16x4 latents in 2x2 patches, two
    5-layer CLIP encoders with projection (pooled 32 + 32), a T5 of width 80 (the CLIP states, 64 wide, are
    zero-padded to it as in SD3), a VAE with scale factor 2 (32 px images), SD3's scheduler. Seeded."""
    transformer = _seeded(seed, lambda: SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=80, pooled_projection_dim=64, out_channels=4,
    ))
    clip = _test_clip_config(32, layers=5, hidden_act="gelu", projection_dim=32)
    return SD3Model(
        transformer, _tiny_vae(seed, 4, scaling_factor=1.5305, shift_factor=0.0609),
        _seeded(seed, lambda: CLIPTextModelWithProjection(clip)), clip_tokenizer(),
        _seeded(seed + 1, lambda: CLIPTextModelWithProjection(clip)), clip_tokenizer(pad_token="!"),
        sd3_scheduler(), name="tiny-sd3", max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
        text_encoder_3=_seeded(seed, lambda: T5EncoderModel(tiny_t5_config(80))), tokenizer_3=_tiny_t5_tokenizer(),
    ).freeze()


def build_tiny_flux(seed: int = 0, guidance_embeds: bool = True) -> FluxModel:
    """A FLUX-shaped stack with random weights: one double and one single transformer block on 2x2-packed
    16x16x4 latents (16 channels a token), a 5-layer CLIP (pooled 32), a T5 of width 32, a VAE with scale factor 2
    (32 px images), FLUX-dev's scheduler. ``guidance_embeds``: FLUX-dev's distilled guidance embedding (False: as
    schnell). Seeded."""
    transformer = _seeded(seed, lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
        guidance_embeds=guidance_embeds,
    ))
    clip = _test_clip_config(32, layers=5, hidden_act="gelu", projection_dim=32)
    return FluxModel(
        transformer, _tiny_vae(seed, 4, scaling_factor=0.3611, shift_factor=0.1159),
        _seeded(seed, lambda: CLIPTextModel(clip)), clip_tokenizer(),
        _seeded(seed, lambda: T5EncoderModel(tiny_t5_config(32))), _tiny_t5_tokenizer(),
        flux_scheduler(), name="tiny-flux", max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
    ).freeze()
