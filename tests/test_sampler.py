"""The differentiable sampler: parity with diffusers' pipeline, exact gradients, gradient modes."""

from __future__ import annotations

import pytest
import torch

from sage_lightning.errors import SageError
from sage_lightning.loading import build_tiny, load_diffusion, make_scheduler
from sage_lightning.sampler import DiffusionSampler, FullGradient, LastKGradient, ResidualGradient
from sage_lightning.text import PromptEncoder

PROMPT = "a photo of a red star"


def _latents(model, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    size = model.unet.config.sample_size
    return torch.randn(batch, model.unet.config.in_channels, size, size, generator=generator)


@pytest.fixture(scope="module")
def vpred_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_vpred")
    build_tiny(seed=1, prediction_type="v_prediction").pipeline().save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++"])
@pytest.mark.parametrize("guidance", [1.0, 5.0])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_forward_parity_with_diffusers_pipeline(tiny_dir, vpred_dir, scheduler, guidance, prediction):
    model = load_diffusion(tiny_dir if prediction == "epsilon" else vpred_dir, scheduler=scheduler)
    assert model.scheduler.config.prediction_type == prediction
    latents = _latents(model)
    with torch.no_grad():
        reference = model.pipeline()(
            [PROMPT, "a blue ring"], latents=latents.clone(), num_inference_steps=6, guidance_scale=guidance,
            output_type="pt",
        ).images
        encoder = PromptEncoder(model.tokenizer, model.text_encoder)
        sampler = DiffusionSampler(model, num_steps=6, guidance_scale=guidance)
        ours = sampler(latents, encoder([PROMPT, "a blue ring"]), encoder([""]))
    assert ours.shape == reference.shape == (2, 3, 64, 64)
    assert (ours - reference).abs().max().item() < 1e-4


def _loss(images: torch.Tensor) -> torch.Tensor:
    weights = torch.linspace(-1, 1, images.numel(), dtype=images.dtype).reshape(images.shape)
    return (images * weights).sum()


def test_full_gradient_matches_finite_differences():
    model = build_tiny(seed=2).to("cpu", torch.float64)
    model.scheduler = make_scheduler("ddim", model.scheduler.config)
    encoder = PromptEncoder(model.tokenizer, model.text_encoder)
    with torch.no_grad():
        cond, uncond = encoder([PROMPT]), encoder([""])
    sampler = DiffusionSampler(model, num_steps=3, guidance_scale=3.0, grad_mode=FullGradient())
    z = _latents(model, batch=1).double().requires_grad_(True)
    _loss(sampler(z, cond, uncond)).backward()
    direction = torch.randn(z.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    eps = 1e-5
    with torch.no_grad():
        numeric = (_loss(sampler(z + eps * direction, cond, uncond))
                   - _loss(sampler(z - eps * direction, cond, uncond))) / (2 * eps)
    analytic = (z.grad * direction).sum()
    assert torch.isclose(analytic, numeric, rtol=1e-5, atol=1e-8), (analytic.item(), numeric.item())


@pytest.fixture(scope="module")
def setup(tiny):
    encoder = PromptEncoder(tiny.tokenizer, tiny.text_encoder)
    with torch.no_grad():
        return tiny, encoder([PROMPT]), encoder([""])


def _run(setup, mode, steps=8, embed_grad=False):
    model, cond, uncond = setup
    cond = cond.clone().requires_grad_(embed_grad)
    z = _latents(model, batch=2).requires_grad_(True)
    images = DiffusionSampler(model, num_steps=steps, guidance_scale=4.0, grad_mode=mode)(z, cond, uncond)
    _loss(images).backward()
    return images.detach(), z.grad, cond.grad


APPROXIMATE_MODES = [LastKGradient(k=2), ResidualGradient(step=0.5, weight=0.7), ResidualGradient(step=3)]


@pytest.mark.parametrize("mode", APPROXIMATE_MODES)
def test_approximate_modes_keep_forward_exact_and_reach_latents(setup, mode):
    exact, _, _ = _run(setup, FullGradient())
    images, z_grad, cond_grad = _run(setup, mode, embed_grad=True)
    assert torch.equal(images, exact)
    assert z_grad is not None and (z_grad.abs().flatten(1).sum(1) > 0).all()
    assert cond_grad is not None and cond_grad.abs().sum() > 0


def test_residual_weight_scales_the_latent_gradient(setup):
    _, g1, _ = _run(setup, ResidualGradient(step=4, weight=1.0))
    _, g2, _ = _run(setup, ResidualGradient(step=4, weight=0.25))
    assert torch.allclose(g2, 0.25 * g1, rtol=1e-5, atol=1e-9)


def test_last_k_equals_residual_at_same_step_with_unit_weight(setup):
    _, g_last, _ = _run(setup, LastKGradient(k=3))
    _, g_res, _ = _run(setup, ResidualGradient(step=5, weight=1.0))
    assert torch.equal(g_last, g_res)


def _saved_bytes(fn) -> int:
    """Bytes that autograd keeps for backward while ``fn`` runs (the graph's activation memory)."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize(
    ("step", "num_steps", "start"),
    [(0.5, 25, 12), (0.5, 27, 13), (0.5, 20, 10), (0.5, 21, 10), (0.29, 100, 29), (0.3, 10, 3), (0.0, 7, 0)],
)
def test_residual_step_fraction_is_floored(step, num_steps, start):
    """floor(w * N), documented in ResidualGradient: round() sent halves to even (25 and 27 steps both graphed 13)."""
    mode = ResidualGradient(step=step)
    assert mode.graph_start(num_steps) == start
    assert num_steps - start >= (1 - step) * num_steps  # at least the share 1 - w keeps a graph


def test_checkpointing_changes_memory_not_values(setup):
    plain = _run(setup, FullGradient(checkpoint=False))
    ckpt = _run(setup, FullGradient(checkpoint=True))
    assert torch.equal(plain[0], ckpt[0])
    assert torch.allclose(plain[1], ckpt[1], rtol=1e-5, atol=1e-8)
    model, cond, uncond = setup
    z = _latents(model, batch=2).requires_grad_(True)

    def forward(checkpoint: bool):
        return lambda: DiffusionSampler(model, 8, 4.0, FullGradient(checkpoint=checkpoint))(z, cond, uncond)

    assert _saved_bytes(forward(True)) < 0.2 * _saved_bytes(forward(False))


def test_sampler_input_errors(tiny):
    with pytest.raises(SageError, match="num_steps=0"):
        DiffusionSampler(tiny, num_steps=0)
    with pytest.raises(SageError, match="needs unconditional"):
        DiffusionSampler(tiny, num_steps=2, guidance_scale=3.0)(_latents(tiny, 1), torch.zeros(1, 77, 32))
    with pytest.raises(SageError, match="k=0"):
        LastKGradient(k=0)
