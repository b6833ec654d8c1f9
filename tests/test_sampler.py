"""The differentiable sampler: parity with diffusers' pipeline, exact gradients, gradient modes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sage_lightning.candidates import WordListCandidates
from sage_lightning.errors import SageError
from sage_lightning.models import build_tiny, load_diffusion, make_scheduler
from sage_lightning.sampler import DiffusionSampler, FullGradient, LastKGradient, ResidualGradient
from sage_lightning.targets import noise_generator, seeded_latent
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


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf")])
def test_residual_weight_must_be_positive_and_finite(weight):
    with pytest.raises(SageError, match=f"weight={weight} must be a finite number > 0"):
        ResidualGradient(step=0.5, weight=weight)


# ------------------------------------------------- stochastic schedulers: noise from per-target generators
STOCHASTIC = [("euler-a", 0.0), ("ddim", 0.5), ("dpm++-sde", 0.0)]
SEEDS = [11, 12]


def _pipeline_and_ours(model, seeds, eta=0.0, steps=6, guidance=5.0):
    """Images of the pipeline given per-row generators seeded with ``seeds``, and the sampler's from the same
    seeds (z0 = seeded_latent, noise = noise_generator)."""
    shape = (model.unet.config.in_channels, model.unet.config.sample_size, model.unet.config.sample_size)
    with torch.no_grad():
        reference = model.pipeline()(
            [PROMPT, "a blue ring"], generator=[torch.Generator().manual_seed(s) for s in seeds],
            num_inference_steps=steps, guidance_scale=guidance, eta=eta, output_type="pt",
        ).images
        encoder = PromptEncoder(model.tokenizer, model.text_encoder)
        latents = torch.stack([seeded_latent(s, shape) for s in seeds])
        sampler = DiffusionSampler(model, num_steps=steps, guidance_scale=guidance, eta=eta)
        torch.manual_seed(1234)  # the global state must not matter
        generators = [noise_generator(s, shape) for s in seeds]
        ours = sampler(latents, encoder([PROMPT, "a blue ring"]), encoder([""]), generators)
    return reference, ours


@pytest.mark.parametrize("scheduler, eta", STOCHASTIC)
def test_stochastic_schedulers_match_the_pipeline_given_the_same_generators(tiny_dir, scheduler, eta):
    model = load_diffusion(tiny_dir, scheduler=scheduler)
    assert DiffusionSampler(model, eta=eta).draws_noise
    reference, ours = _pipeline_and_ours(model, SEEDS, eta)
    assert (ours - reference).abs().max().item() < 1e-4
    _, other_noise = _pipeline_and_ours(model, [SEEDS[0], 99], eta)  # row 1: other noise and z0
    assert torch.equal(other_noise[0], ours[0]) and (other_noise[1] - ours[1]).abs().max() > 1e-3


def test_a_stochastic_scheduler_without_generators_is_refused(tiny_dir):
    model = load_diffusion(tiny_dir, scheduler="euler-a")
    encoder = PromptEncoder(model.tokenizer, model.text_encoder)
    with torch.no_grad(), pytest.raises(SageError, match="draws noise at every step"):
        DiffusionSampler(model, num_steps=2, guidance_scale=1.0)(_latents(model), encoder([PROMPT, PROMPT]))


def test_the_loader_refuses_a_scheduler_it_does_not_support(tiny, tmp_path):
    from diffusers import LMSDiscreteScheduler

    pipe = tiny.pipeline()
    pipe.scheduler = LMSDiscreteScheduler.from_config(tiny.scheduler.config)
    pipe.save_pretrained(tmp_path)
    with pytest.raises(SageError, match="ships LMSDiscreteScheduler, which sage does not support") as err:
        load_diffusion(str(tmp_path), scheduler=None)
    assert len(str(err.value).splitlines()) == 1
    chosen = load_diffusion(str(tmp_path), scheduler="euler-a").scheduler
    assert type(chosen).__name__ == "EulerAncestralDiscreteScheduler"


@pytest.mark.parametrize("scheduler, eta", [("euler-a", 0.0), ("ddim", 0.5)])
def test_search_noise_is_a_function_of_the_target_not_of_the_global_state_or_the_gradient_mode(scheduler, eta):
    from sage_lightning.datamodules import ClassPromptDataModule
    from sage_lightning.searches import LatentSearch

    images = []
    for mode in (FullGradient(), ResidualGradient(step=0.5)):
        search = LatentSearch(diffusion="tiny", num_steps=3, scheduler=scheduler, grad_mode=mode, eta=eta)
        search.prepare(ClassPromptDataModule(classes=["star", "ring"]).targets)
        search.trainer = None
        assert search.sampler.draws_noise  # DDIM's eta reaches the sampler
        ids = torch.tensor([0, 1])
        cond = search.prompt_embeddings([t.prompt for t in search.targets])
        seeds = [t.seed for t in search.targets]
        for global_seed in (0, 1):
            torch.manual_seed(global_seed)
            with torch.no_grad():
                images.append(search.generate(search.initial_latents(ids), cond, seeds))
    assert all(torch.equal(images[0], other) for other in images[1:])
    with pytest.raises(SageError, match="eta=-0.1"):
        LatentSearch(diffusion="tiny", eta=-0.1)


# ----------------------------------------------- PNDM: counts from the scheduler's own timesteps (item 7)
def _pndm(model, skip_prk_steps: bool):
    from diffusers import PNDMScheduler

    return dataclasses.replace(model, scheduler=PNDMScheduler.from_config(model.scheduler.config,
                                                                          skip_prk_steps=skip_prk_steps))


@pytest.mark.parametrize("skip_prk_steps, loop", [(True, 5), (False, 13)])
def test_pndm_counts_come_from_its_own_timesteps(setup, skip_prk_steps, loop):
    model, cond, uncond = setup
    model = _pndm(model, skip_prk_steps)
    calls: list[bool] = []
    handle = model.unet.register_forward_hook(lambda m, args, out: calls.append(torch.is_grad_enabled()))
    try:
        residual = ResidualGradient(step=0.5)
        for mode, graphed in ((LastKGradient(k=2), 2), (residual, loop - residual.graph_start(loop))):
            calls.clear()
            sampler = DiffusionSampler(model, num_steps=4, guidance_scale=4.0, grad_mode=mode)
            z = _latents(model, batch=1).requires_grad_(True)
            sampler(z, cond, uncond)
            assert sampler.loop_length == len(calls) == loop  # 4 steps, but PNDM runs `loop` UNet calls
            assert sampler.unet_evaluations(1) == 2 * len(calls)  # guided: cond and uncond
            assert sampler.graphed_steps() == sum(calls) == graphed
    finally:
        handle.remove()
    reference = model.pipeline()(
        [PROMPT], latents=_latents(model, batch=1), num_inference_steps=4, guidance_scale=4.0, output_type="pt"
    ).images
    with torch.no_grad():
        ours = DiffusionSampler(model, num_steps=4, guidance_scale=4.0)(_latents(model, batch=1), cond, uncond)
    assert (ours - reference).abs().max().item() < 1e-4


def test_search_costs_follow_the_scheduler_timesteps():
    """PNDM at 4 steps runs 13 timesteps (tiny's config keeps its PRK warm-up): every cost a search reports
    equals DDIM's at 13 steps, before and after the model is loaded."""
    from sage_lightning.datamodules import ClassPromptDataModule
    from sage_lightning.searches import LatentSearch, PromptSearch

    def latent(scheduler: str, steps: int) -> LatentSearch:
        return LatentSearch(diffusion="tiny", num_steps=steps, scheduler=scheduler, grad_mode=LastKGradient(k=2))

    pndm, ddim = latent("pndm", 4), latent("ddim", 13)
    assert pndm.loop_length == ddim.loop_length == 13
    assert pndm.forward_equivalents(3) == ddim.forward_equivalents(3)
    for search in (pndm, ddim):
        search.prepare(ClassPromptDataModule(classes=["star"]).targets)
    assert pndm.unet_evaluations(3) == ddim.unet_evaluations(3)
    assert pndm.forward_equivalents(3) == ddim.forward_equivalents(3)
    words = WordListCandidates(["red"])
    prompt = [
        PromptSearch(candidates=words, diffusion="tiny", num_steps=n, scheduler=name)
        for name, n in (("pndm", 4), ("ddim", 13))
    ]
    assert prompt[0].cost == prompt[1].cost and prompt[0].iteration_cost() == prompt[1].iteration_cost()
