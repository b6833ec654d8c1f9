"""Stable Diffusion XL (issue 13): loading, text conditioning and sampler parity with diffusers' pipeline.

The tiny SDXL is diffusers' own SDXL test stack (``get_dummy_components``) on the real CLIP BPE vocabulary,
saved with ``save_pretrained`` and re-loaded through ``models.load_diffusion`` as a user's folder would be.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from sage_lightning.errors import SageError
from sage_lightning.models import DiffusionXLModel, build_tiny_xl, load_diffusion, load_scheduler, make_scheduler
from sage_lightning.sampler import DiffusionSampler, FullGradient, LastKGradient, ResidualGradient
from sage_lightning.text import PromptEncoder, XLConditioning, XLPromptEncoder, prompt_encoder, slot

PROMPTS = ["a photo of a red star", "a blue ring"]


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny_sdxl")
    build_tiny_xl(seed=0).pipeline().save_pretrained(folder, safe_serialization=True)
    return str(folder)


@pytest.fixture(scope="module")
def xl(xl_dir) -> DiffusionXLModel:
    return load_diffusion(xl_dir, scheduler=None)


def _latents(model, batch: int = 2, seed: int = 0) -> torch.Tensor:
    size = model.unet.config.sample_size
    return torch.randn(batch, model.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(seed))


def _pipeline_images(model: DiffusionXLModel, latents, steps: int, guidance: float, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.pipeline()(
            PROMPTS[: len(latents)], latents=latents.clone(), num_inference_steps=steps, guidance_scale=guidance,
            output_type="pt", **{**model.pipeline_kwargs(), **kwargs},
        ).images


# ------------------------------------------------------------------------------------------- loading
def test_a_saved_sdxl_folder_loads_with_both_encoders_and_the_real_clip_tokenizer(xl, xl_dir):
    assert isinstance(xl, DiffusionXLModel) and isinstance(xl.pipeline(), StableDiffusionXLPipeline)
    assert type(xl.text_encoder).__name__ == "CLIPTextModel"
    assert type(xl.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert type(xl.scheduler).__name__ == "EulerDiscreteScheduler" and xl.scheduler.config.timestep_spacing == "leading"
    ids = [49406, 320, 1125, 539, 320, 3878, 28394, 49407]  # STACK_NOTES.md: open_clip's ids
    assert xl.tokenizer("a photo of a golden retriever").input_ids == ids
    assert xl.tokenizer_2("a photo of a golden retriever").input_ids == ids
    assert xl.tokenizer.pad_token == "<|endoftext|>" and xl.tokenizer_2.pad_token == "!"  # as SDXL's two
    assert xl.force_zeros_for_empty_prompt
    assert xl.add_time_ids().tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]
    assert all(not p.requires_grad for m in xl.modules() for p in m.parameters())
    assert type(load_scheduler(xl_dir, None)).__name__ == "EulerDiscreteScheduler"
    assert load_scheduler(xl_dir, "euler-trailing").config.timestep_spacing == "trailing"


def test_tiny_xl_is_a_builtin_source_and_sd1_folders_still_load_as_sd1(tiny_dir):
    assert isinstance(load_diffusion("tiny-xl"), DiffusionXLModel)
    assert not isinstance(load_diffusion(tiny_dir), DiffusionXLModel)
    assert type(load_scheduler("tiny-xl", None)).__name__ == "EulerDiscreteScheduler"


def test_float16_keeps_the_force_upcast_vae_in_float32_and_gives_finite_images(xl_dir, xl):
    """diffusers upcasts SDXL's VAE for every decode in float16 (it overflows); sage keeps it float32."""
    half = load_diffusion(xl_dir, scheduler=None, dtype="float16")
    assert half.vae.config.force_upcast
    assert (half.unet.dtype, half.text_encoder_2.dtype, half.vae.dtype) == (torch.float16,) * 2 + (torch.float32,)
    assert not half.keeps_float32(half.vae, torch.bfloat16)  # bfloat16 does not overflow: no upcast (as diffusers)
    latents = _latents(xl)
    images = []
    for model in (half, xl):
        encoder = prompt_encoder(model)
        with torch.no_grad():
            images.append(DiffusionSampler(model, 3, 5.0)(latents, encoder(PROMPTS), encoder.unconditional()))
    assert torch.isfinite(images[0]).all() and images[0].dtype == torch.float32
    assert (images[0] - images[1]).abs().max() < 1e-2
    # An activation beyond float16's range (65504) before the decoder's first norm: finite in the float32 VAE,
    # NaN once the VAE runs in float16 (what SDXL's VAE does on real images without force_upcast).
    with torch.no_grad():
        half.vae.decoder.conv_in.weight.mul_(1e5)
        sampler = DiffusionSampler(half, 1, 1.0)
        assert torch.isfinite(sampler.decode(latents)).all()
        half.vae.to(torch.float16)
        assert not torch.isfinite(sampler.decode(latents)).all()


# ---------------------------------------------------------------------------------------------- text
def test_the_prompt_encoder_equals_the_pipelines_encode_prompt(xl):
    encoder = prompt_encoder(xl)
    assert isinstance(encoder, XLPromptEncoder) and encoder.embed_dim == 64 and encoder.widths == [32, 32]
    with torch.no_grad():
        cond, uncond = encoder(PROMPTS), encoder.unconditional()
        pipe = xl.pipeline()
        hidden, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True)
    assert isinstance(cond, XLConditioning) and cond.shape == (2, 77, 64) and cond.pooled.shape == (2, 32)
    assert torch.equal(cond.hidden, hidden) and torch.equal(cond.pooled, pooled)
    assert torch.equal(uncond.hidden, negative[:1]) and torch.equal(uncond.pooled, negative_pooled[:1])
    assert uncond.hidden.abs().sum() == 0  # force_zeros_for_empty_prompt


def test_a_slot_is_one_vector_per_encoder_and_reaches_both_tables(xl):
    """The slot vector's first 32 entries replace the first encoder's token embedding, the rest the second's:
    filling the slot with a word's two table rows gives that word's conditioning exactly."""
    encoder = prompt_encoder(xl)
    star = encoder.word_ids("star")
    assert len(star) == 1
    row = encoder.embedding_rows(star)[0]
    assert torch.equal(row[:32], xl.text_encoder.get_input_embeddings().weight[star[0]])
    assert torch.equal(row[32:], xl.text_encoder_2.get_input_embeddings().weight[star[0]])
    with torch.no_grad():
        plain = encoder(["a photo of a star"])
        slotted = encoder([f"a photo of a {slot('x')}"], {"x": row})
    assert torch.equal(plain.hidden, slotted.hidden) and torch.equal(plain.pooled, slotted.pooled)
    vec = row.clone().requires_grad_(True)
    out = encoder([f"a photo of a {slot('x')}"], {"x": vec})
    (out.hidden.sum() + out.pooled.sum()).backward()
    assert vec.grad[:32].abs().sum() > 0 and vec.grad[32:].abs().sum() > 0
    similarity = torch.nn.functional.cosine_similarity(encoder.pooled(PROMPTS), encoder.pooled(PROMPTS))
    assert torch.allclose(similarity, torch.ones(2))


# ------------------------------------------------------------------------------------ sampler parity
MODES = [
    FullGradient(),
    FullGradient(checkpoint=True, decoder_checkpoint=True),
    LastKGradient(k=2),
    ResidualGradient(step=0.5, weight=0.7, checkpoint=True),
]


@pytest.mark.parametrize("scheduler", ["euler", "euler-trailing", "ddim", "dpm++"])
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_sampler_equals_the_sdxl_pipeline_in_every_gradient_mode(xl, scheduler, guidance):
    """The sampler's images equal ``StableDiffusionXLPipeline(output_type="pt")`` within 1e-4, whatever the
    gradient mode (the forward runs with a graph, as in a search): the batch of two prompts in full gradient,
    the first prompt alone in the other modes (rows are independent; this keeps the test fast)."""
    model = dataclasses.replace(xl, scheduler=make_scheduler(scheduler, xl.scheduler.config))  # as load_diffusion
    latents = _latents(model)
    reference = _pipeline_images(model, latents, steps=3, guidance=guidance)
    assert reference.shape == (2, 3, 64, 64)
    encoder = prompt_encoder(model)
    with torch.no_grad():
        cond, uncond = encoder(PROMPTS), encoder.unconditional()
    for rows, modes in ((2, MODES[:1]), (1, MODES[1:])):
        for mode in modes:
            z = latents[:rows].clone().requires_grad_(True)
            sampler = DiffusionSampler(model, num_steps=3, guidance_scale=guidance, grad_mode=mode)
            ours = sampler(z, cond if rows == 2 else encoder(PROMPTS[:1]), uncond)
            assert ours.requires_grad and (ours - reference[:rows]).abs().max().item() < 1e-4, mode


def test_euler_ancestral_noise_comes_from_the_targets_generators_as_in_the_pipeline(xl):
    """A scheduler that draws noise at every step: the pipeline given one generator per row equals the sampler
    given z0 = seeded_latent and the noise of noise_generator, from the same seeds."""
    from sage_lightning.targets import noise_generator, seeded_latent

    model = dataclasses.replace(xl, scheduler=make_scheduler("euler-a", xl.scheduler.config))
    shape, seeds = (4, 32, 32), [11, 12]
    with torch.no_grad():
        reference = model.pipeline()(
            PROMPTS, generator=[torch.Generator().manual_seed(s) for s in seeds], num_inference_steps=3,
            guidance_scale=5.0, output_type="pt", **model.pipeline_kwargs(),
        ).images
        encoder = prompt_encoder(model)
        latents = torch.stack([seeded_latent(s, shape) for s in seeds])
        generators = [noise_generator(s, shape) for s in seeds]
        ours = DiffusionSampler(model, 3, 5.0)(latents, encoder(PROMPTS), encoder.unconditional(), generators)
    assert (ours - reference).abs().max().item() < 1e-4


def test_micro_conditioning_reaches_the_unet_as_in_the_pipeline(xl):
    """``add_time_ids`` (original size, crop, target size) changes the image, and the same way as the pipeline's."""
    moved = dataclasses.replace(xl, original_size=(32, 48), crops_coords_top_left=(4, 8), target_size=(64, 64))
    latents = _latents(xl, batch=1)
    encoder = prompt_encoder(moved)
    with torch.no_grad():
        ours = DiffusionSampler(moved, 2, 5.0)(latents, encoder(PROMPTS[:1]), encoder.unconditional())
        default = DiffusionSampler(xl, 2, 5.0)(latents, encoder(PROMPTS[:1]), encoder.unconditional())
    assert (ours - _pipeline_images(moved, latents, steps=2, guidance=5.0)).abs().max() < 1e-4
    assert (ours - default).abs().max() > 1e-4


def test_full_gradient_through_both_encoders_matches_finite_differences():
    """float64: d loss / d (latent, slot vector) through the pooled path, time ids and both encoders (DDIM:
    diffusers' Euler computes its step in float32 even for float64 inputs, too coarse for finite differences)."""
    model = build_tiny_xl(seed=3).to("cpu", torch.float64)
    model.scheduler = make_scheduler("ddim", model.scheduler.config)
    encoder = prompt_encoder(model)
    with torch.no_grad():
        uncond = encoder.unconditional()
    sampler = DiffusionSampler(model, num_steps=2, guidance_scale=3.0, grad_mode=FullGradient(checkpoint=True))
    generator = torch.Generator().manual_seed(5)
    z = _latents(model, batch=1).double().requires_grad_(True)
    e = (0.02 * torch.randn(encoder.embed_dim, generator=generator, dtype=torch.float64)).requires_grad_(True)
    weights = torch.linspace(-1, 1, 3 * 64 * 64, dtype=torch.float64).reshape(1, 3, 64, 64)

    def loss(z_, e_):
        return (sampler(z_, encoder([f"a photo of a {slot('x')}"], {"x": e_}), uncond) * weights).sum()

    loss(z, e).backward()
    dz = torch.randn(z.shape, generator=generator, dtype=torch.float64)
    de = torch.randn(e.shape, generator=generator, dtype=torch.float64)
    eps = 1e-5
    with torch.no_grad():
        numeric = (loss(z + eps * dz, e + eps * de) - loss(z - eps * dz, e - eps * de)) / (2 * eps)
    analytic = (z.grad * dz).sum() + (e.grad * de).sum()
    assert torch.isclose(analytic, numeric, rtol=1e-5, atol=1e-8), (analytic.item(), numeric.item())
    assert e.grad[:32].abs().sum() > 0 and e.grad[32:].abs().sum() > 0


def test_decoder_checkpointing_keeps_gradients_and_saves_memory(xl):
    encoder = prompt_encoder(xl)
    with torch.no_grad():
        cond, uncond = encoder(PROMPTS[:1]), encoder.unconditional()
    grads, saved = [], []
    for decoder_checkpoint in (False, True):
        z = _latents(xl, batch=1).requires_grad_(True)
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        mode = FullGradient(checkpoint=True, decoder_checkpoint=decoder_checkpoint)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            images = DiffusionSampler(xl, 2, 3.0, mode)(z, cond, uncond)
        images.mean().backward()
        grads.append(z.grad)
        saved.append(total)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-9)
    assert saved[1] < 0.5 * saved[0]
    assert not xl.vae.decoder.gradient_checkpointing  # switched off again after the decode


def test_the_sampler_refuses_the_wrong_kind_of_prompt_embeddings(xl, tiny):
    latents = _latents(xl, batch=1)
    with pytest.raises(SageError, match="takes XLConditioning"):
        DiffusionSampler(xl, 1, 1.0)(latents, torch.zeros(1, 77, 64))
    assert isinstance(prompt_encoder(tiny), PromptEncoder)
    with pytest.raises(SageError, match="takes a tensor"):
        DiffusionSampler(tiny, 1, 1.0)(latents, prompt_encoder(xl)(PROMPTS[:1]))
