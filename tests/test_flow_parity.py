"""SD3 and FLUX (issue 23): loading, and the flow sampler's parity with diffusers' own pipelines.

The tiny stacks (flow_models/tiny.py, diffusers' pipeline-test configs built offline) are saved with
``save_pretrained`` and re-loaded through ``models.load_diffusion``, as a user's folder would be; the pipelines
run on those same modules with ``output_type="pt"`` and the same initial latents.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from diffusers.utils.torch_utils import randn_tensor

from sage_lightning import sampler as sampler_module
from sage_lightning.errors import SageError
from sage_lightning.flow_models import FluxModel, SD3Model, build_tiny_flux, build_tiny_sd3, t5_tokenizer
from sage_lightning.flow_sampler import FlowSampler
from sage_lightning.models import load_diffusion, load_scheduler
from sage_lightning.sampler import FullGradient, LastKGradient, ResidualGradient

PROMPTS = ["a photo of a red star", "a blue ring"]
MODES = [
    FullGradient(),
    FullGradient(checkpoint=True, decoder_checkpoint=True),
    LastKGradient(k=2, checkpoint=True),
    ResidualGradient(step=0.5, weight=0.7, checkpoint=True),
]
STEPS = 3


def _saved(tmp_path_factory, name: str, model) -> str:
    folder = tmp_path_factory.mktemp(name)
    model.pipeline().save_pretrained(folder, safe_serialization=True)
    return str(folder)


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> str:
    return _saved(tmp_path_factory, "tiny_sd3", build_tiny_sd3(seed=0))


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> str:
    return _saved(tmp_path_factory, "tiny_flux", build_tiny_flux(seed=0))


@pytest.fixture(scope="module")
def sd3(sd3_dir) -> SD3Model:
    return load_diffusion(sd3_dir, scheduler=None)


@pytest.fixture(scope="module")
def flux(flux_dir) -> FluxModel:
    return load_diffusion(flux_dir, scheduler=None)


def _latents(model, size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    shape = (batch, *model.latent_shape(size, size))
    return randn_tensor(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def _check_modes(model, latents, reference, cond, uncond, **sampler_kwargs) -> float:
    """The sampler's images in every gradient mode (with a graph, as in a search) against ``reference``: the batch
    in full gradient, the first row alone in the other modes (rows are independent). Returns the largest error."""
    worst = 0.0
    for rows, modes in ((2, MODES[:1]), (1, MODES[1:])):
        for mode in modes:
            z = latents[:rows].clone().requires_grad_(True)
            c = cond if rows == 2 else dataclasses.replace(cond, hidden=cond.hidden[:1], pooled=cond.pooled[:1])
            ours = FlowSampler(model, num_steps=STEPS, grad_mode=mode, **sampler_kwargs)(z, c, uncond)
            error = (ours - reference[:rows]).abs().max().item()
            assert ours.requires_grad and error < 1e-4, (mode, error)
            worst = max(worst, error)
    return worst


# ------------------------------------------------------------------------------------------- loading
def test_saved_sd3_and_flux_folders_load_with_their_encoders_and_vae_factors(sd3, flux, sd3_dir, flux_dir):
    assert isinstance(sd3, SD3Model) and isinstance(sd3.pipeline(), StableDiffusion3Pipeline)
    assert [type(e).__name__ for e in (sd3.text_encoder, sd3.text_encoder_2, sd3.text_encoder_3)] == [
        "CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel"]
    assert isinstance(flux, FluxModel) and isinstance(flux.pipeline(), FluxPipeline)
    assert [type(e).__name__ for e in (flux.text_encoder, flux.text_encoder_2)] == ["CLIPTextModel", "T5EncoderModel"]
    assert (sd3.vae.config.scaling_factor, sd3.vae.config.shift_factor) == (1.5305, 0.0609)
    assert (flux.vae.config.scaling_factor, flux.vae.config.shift_factor) == (0.3611, 0.1159)
    assert sd3.max_sequence_length == flux.max_sequence_length == 32  # from the saved T5 tokenizer's max length
    assert type(sd3.tokenizer_3).__name__ == type(flux.tokenizer_2).__name__ == "T5Tokenizer"
    assert sd3.tokenizer("a photo of a golden retriever").input_ids[:3] == [49406, 320, 1125]  # the real CLIP BPE
    assert all(not p.requires_grad for m in (*sd3.modules(), *flux.modules()) for p in m.parameters())
    assert not sd3.scheduler.config.use_dynamic_shifting and flux.scheduler.config.use_dynamic_shifting
    assert type(load_scheduler(flux_dir, None)).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert isinstance(load_diffusion("tiny-flux", scheduler="flow-euler"), FluxModel)
    assert load_scheduler("tiny-sd3", None).config.shift == 3.0


def test_a_unet_scheduler_name_or_a_missing_folder_is_one_clear_error(sd3_dir, tmp_path):
    with pytest.raises(SageError, match="flow-matching transformer: set model.init_args.scheduler to null"):
        load_diffusion(sd3_dir, scheduler="ddim")
    with pytest.raises(SageError, match="does not exist"):
        load_diffusion(str(tmp_path / "no_such_model"), scheduler=None)


def test_loading_a_folder_reads_its_model_index_once(flux, monkeypatch, tmp_path):
    """Family detection and loading share one read of model_index.json (FluxPipeline.from_pretrained's own read of
    it is diffusers' and not counted: only our reads go through StableDiffusion3Pipeline.load_config)."""
    folder = tmp_path / "flux"
    flux.pipeline().save_pretrained(folder, safe_serialization=True)
    reads = []
    load_config = StableDiffusion3Pipeline.load_config
    monkeypatch.setattr(StableDiffusion3Pipeline, "load_config",
                        lambda *args, **kwargs: reads.append(args) or load_config(*args, **kwargs))
    assert isinstance(load_diffusion(str(folder), scheduler=None), FluxModel)
    assert type(load_scheduler(str(folder), None)).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert len(reads) == 1


def test_the_offline_t5_tokenizer_is_deterministic_and_covers_any_text():
    tokenizer = t5_tokenizer()
    ids = tokenizer("a photo of a red star, 3x!").input_ids
    assert ids[-1] == tokenizer.eos_token_id == 1 and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a red star, 3x!"
    assert t5_tokenizer.__wrapped__().get_vocab() == tokenizer.get_vocab()  # built anew: the same vocabulary


# ------------------------------------------------------------------------------------------- SD3 parity
@pytest.mark.parametrize("size", [32, 48])
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_sampler_equals_stable_diffusion_3_pipeline_in_every_gradient_mode(sd3, size, guidance):
    latents = _latents(sd3, size)
    with torch.no_grad():
        reference = sd3.pipeline()(
            PROMPTS, latents=latents.clone(), height=size, width=size, num_inference_steps=STEPS,
            guidance_scale=guidance, max_sequence_length=sd3.max_sequence_length, output_type="pt",
        ).images
        cond, uncond = sd3.encode(PROMPTS), sd3.unconditional()
    assert reference.shape == (2, 3, size, size)
    worst = _check_modes(sd3, latents, reference, cond, uncond, guidance_scale=guidance)
    print(f"SD3 {size}px guidance {guidance}: max |ours - pipeline| = {worst:.2e}")


def test_sd3_with_dynamic_shifting_follows_the_pipelines_mu(sd3):
    dynamic = FlowMatchEulerDiscreteScheduler.from_config(sd3.scheduler.config, use_dynamic_shifting=True)
    model = dataclasses.replace(sd3, scheduler=dynamic)
    latents = _latents(model, 48, batch=1)
    with torch.no_grad():
        reference = model.pipeline()(
            PROMPTS[:1], latents=latents.clone(), height=48, width=48, num_inference_steps=STEPS, guidance_scale=4.0,
            max_sequence_length=model.max_sequence_length, output_type="pt",
        ).images
        ours = FlowSampler(model, STEPS, guidance_scale=4.0)(latents, model.encode(PROMPTS[:1]), model.unconditional())
    static = FlowSampler(sd3, STEPS).fresh_scheduler(24, 24, "cpu").sigmas
    assert not torch.allclose(FlowSampler(model, STEPS).fresh_scheduler(24, 24, "cpu").sigmas, static)
    assert (ours - reference).abs().max().item() < 1e-4


# ------------------------------------------------------------------------------------------- FLUX parity
def _flux_reference(model, latents, size: int, guidance: float, **kwargs) -> torch.Tensor:
    b, c, h, w = latents.shape
    with torch.no_grad():
        return model.pipeline()(
            PROMPTS[:b], latents=FluxPipeline._pack_latents(latents.clone(), b, c, h, w), height=size, width=size,
            num_inference_steps=STEPS, guidance_scale=guidance, max_sequence_length=model.max_sequence_length,
            output_type="pt", **kwargs,
        ).images


@pytest.mark.parametrize("size", [32, 48])
@pytest.mark.parametrize("guidance", [1.0, 3.5])
def test_sampler_equals_the_flux_pipeline_with_its_guidance_embedding_in_every_gradient_mode(flux, size, guidance):
    latents = _latents(flux, size)
    reference = _flux_reference(flux, latents, size, guidance)
    assert reference.shape == (2, 3, size, size)
    with torch.no_grad():
        cond = flux.encode(PROMPTS)
    worst = _check_modes(flux, latents, reference, cond, None, guidance_scale=guidance)
    print(f"FLUX {size}px guidance {guidance}: max |ours - pipeline| = {worst:.2e}")


@pytest.mark.parametrize("size", [32, 48])
def test_flux_true_cfg_and_a_model_without_guidance_embedding_equal_the_pipeline(flux, size):
    latents = _latents(flux, size)
    reference = _flux_reference(flux, latents, size, 3.5, true_cfg_scale=2.0, negative_prompt="")
    with torch.no_grad():
        cond, uncond = flux.encode(PROMPTS), flux.unconditional()
    worst = _check_modes(flux, latents, reference, cond, uncond, guidance_scale=3.5, true_cfg_scale=2.0)
    schnell = build_tiny_flux(seed=1, guidance_embeds=False)
    reference = _flux_reference(schnell, latents, size, 0.0)
    with torch.no_grad():
        ours = FlowSampler(schnell, STEPS, guidance_scale=0.0)(latents, schnell.encode(PROMPTS))
    worst = max(worst, (ours - reference).abs().max().item())
    assert worst < 1e-4
    print(f"FLUX {size}px true CFG / no guidance embedding: max |ours - pipeline| = {worst:.2e}")


def test_flux_pipeline_drawing_its_own_noise_equals_the_sampler_on_the_unpacked_draw(flux):
    """The search variable is the unpacked latent: the pipeline's own draw from a generator, packed inside it,
    equals the sampler fed the same draw in the unpacked shape."""
    with torch.no_grad():
        reference = flux.pipeline()(
            PROMPTS[:1], generator=torch.Generator().manual_seed(7), height=32, width=32, num_inference_steps=STEPS,
            max_sequence_length=flux.max_sequence_length, output_type="pt",
        ).images
        z = randn_tensor((1, *flux.latent_shape(32, 32)), generator=torch.Generator().manual_seed(7))
        ours = FlowSampler(flux, STEPS, guidance_scale=3.5)(z, flux.encode(PROMPTS[:1]))
    assert (ours - reference).abs().max().item() < 1e-4


# ------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_gradients_reach_the_initial_latent_and_checkpointing_changes_none(family, sd3, flux):
    model = sd3 if family == "sd3" else flux
    latents = _latents(model, 32, batch=1)
    with torch.no_grad():
        cond, uncond = model.encode(PROMPTS[:1]), model.unconditional()
    grads = {}
    for mode in (FullGradient(), FullGradient(checkpoint=True, decoder_checkpoint=True), LastKGradient(k=STEPS),
                 LastKGradient(k=1, checkpoint=True), ResidualGradient(step=1, weight=0.5)):
        z = latents.clone().requires_grad_(True)
        image = FlowSampler(model, STEPS, guidance_scale=4.0, grad_mode=mode, true_cfg_scale=2.0)(z, cond, uncond)
        image.mean().backward()
        assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0, mode
        grads[repr(mode)] = z.grad
    full = grads[repr(FullGradient())]
    assert torch.allclose(grads[repr(FullGradient(checkpoint=True, decoder_checkpoint=True))], full, atol=1e-6)
    assert torch.allclose(grads[repr(LastKGradient(k=STEPS))], full, atol=1e-6)  # k = N: the exact gradient
    assert not torch.allclose(grads[repr(LastKGradient(k=1, checkpoint=True))], full, atol=1e-6)


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("mode", [FullGradient, lambda **kw: LastKGradient(k=2, **kw),
                                  lambda **kw: ResidualGradient(step=1, weight=0.5, **kw)],
                         ids=["full", "last_k", "residual"])
def test_checkpointing_runs_every_transformer_block_checkpointed_and_keeps_the_gradient(family, mode, sd3, flux,
                                                                                       monkeypatch):
    """``checkpoint``: each joint / single block of each transformer call of each graphed step runs under a
    (reentrant) checkpoint, the transformer is left unchecked after; the gradient equals the unchecked one."""
    model = sd3 if family == "sd3" else flux
    latents = _latents(model, 32, batch=1)
    with torch.no_grad():
        cond, uncond = model.encode(PROMPTS[:1]), model.unconditional()
    checkpointed: list[str] = []

    def counting(module, *args):
        checkpointed.append(type(module).__name__)
        return reentrant(module, *args)

    reentrant = sampler_module._reentrant_checkpoint
    monkeypatch.setattr(sampler_module, "_reentrant_checkpoint", counting)
    grads = []
    for kwargs in ({}, {"checkpoint": True, "decoder_checkpoint": True}):
        z = latents.clone().requires_grad_(True)
        sampler = FlowSampler(model, STEPS, guidance_scale=4.0, grad_mode=mode(**kwargs), true_cfg_scale=2.0)
        sampler(z, cond, uncond).mean().backward()
        grads.append(z.grad)
    blocks = [*model.transformer.transformer_blocks, *getattr(model.transformer, "single_transformer_blocks", [])]
    block_calls = [n for n in checkpointed if n.endswith("TransformerBlock")]
    calls = sampler.cost.branches if family == "flux" else 1  # SD3 batches its two branches in one call
    assert len(block_calls) == len(blocks) * sampler.cost.graphed_steps * calls > 0
    assert {"UNetMidBlock2D", "UpDecoderBlock2D"} <= set(checkpointed)  # the VAE decoder's blocks
    assert not model.transformer.gradient_checkpointing and not model.vae.decoder.gradient_checkpointing
    assert torch.equal(grads[1], grads[0]), (grads[1] - grads[0]).abs().max()


@pytest.mark.parametrize("source", ["tiny-sd3", "tiny-flux"])
def test_a_bfloat16_model_samples_float32_latents_close_to_float32_with_float32_gradients(source):
    latents = None
    images = []
    for dtype in ("float32", "bfloat16"):
        model = load_diffusion(source, scheduler=None, dtype=dtype)
        latents = _latents(model, 32, batch=1) if latents is None else latents
        with torch.no_grad():
            cond, uncond = model.encode(PROMPTS[:1]), model.unconditional()
        z = latents.clone().requires_grad_(True)
        image = FlowSampler(model, STEPS, guidance_scale=4.0, grad_mode=LastKGradient(2, checkpoint=True),
                            true_cfg_scale=2.0)(z, cond, uncond)
        image.mean().backward()
        assert image.dtype == z.grad.dtype == torch.float32 and torch.isfinite(z.grad).all()
        images.append(image.detach())
    assert model.transformer.dtype == torch.bfloat16 and (images[0] - images[1]).abs().max() < 5e-2
