"""Measured: time and peak memory of one search iteration through a flow transformer (issue 23 item 5).

What ``python benchmarks/flow_memory.py --measure`` runs (on a GPU for the full-size stacks): the published
architectures of Stable Diffusion 3 medium and FLUX.1 dev (:data:`flow_memory.SD3_MEDIUM`, ``FLUX_DEV``,
``FLOW_VAE``) built with random weights directly on the device in ``--dtype``, no text encoders (the prompt
embeddings are random tensors of the pipelines' shapes: SD3 77 CLIP + 256 T5 tokens, FLUX 512 T5 tokens), or the
tiny stacks (``tiny-sd3``, ``tiny-flux``: what the tests run on a CPU). For each gradient mode of
:data:`flow_memory.MODES`, one search iteration: the :class:`~sage_lightning.flow_sampler.FlowSampler` image of a
latent that requires a gradient and a backward to it (the discriminator's own forward and backward, a few hundred M
parameters at 224 px, are left out); then the plain pipeline call (``StableDiffusion3Pipeline`` / ``FluxPipeline``
on the same embeddings, ``output_type="pt"``, no gradient). Rows: seconds (best of ``--repeats``), the peak of
allocated GPU memory (weights included; ``-`` on a CPU) and the iteration's time over the plain call's. A mode that
runs out of GPU memory is reported as ``OOM``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
from flow_memory import FLOW_VAE, FLUX_DEV, SD3_MEDIUM  # benchmarks/ is on sys.path when the script runs

from sage_lightning.flow_models import FlowModel, FluxModel, SD3Model, build_tiny_flux, build_tiny_sd3
from sage_lightning.flow_models.tiny import flux_scheduler, sd3_scheduler
from sage_lightning.flow_sampler import FlowSampler
from sage_lightning.sampler import GradientMode
from sage_lightning.text import XLConditioning

GIB = 2**30


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Within: new floating-point parameters are made in ``dtype`` (a full-size model never exists in float32)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _full_size(record: type[FlowModel], transformer: torch.nn.Module, vae: AutoencoderKL, scheduler) -> FlowModel:
    """A record of random full-size modules with no text encoders (the embeddings are given)."""
    extra = {"text_encoder_3": None, "tokenizer_3": None} if record is SD3Model else {}
    return record(transformer, vae, None, None, None, None, scheduler, name=f"random {record.__name__}", **extra)


def build_stack(name: str, dtype: torch.dtype, device: str) -> FlowModel:
    """``name``'s stack in ``dtype`` on ``device``, frozen (full size: built on the device, random weights)."""
    if name in ("tiny-sd3", "tiny-flux"):
        model = (build_tiny_sd3 if name == "tiny-sd3" else build_tiny_flux)(seed=0)
        model = dataclasses.replace(model, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                                    **({"text_encoder_3": None, "tokenizer_3": None} if name == "tiny-sd3" else {}))
        model.transformer.to(device, dtype)
        model.vae.to(device, dtype)
        return model
    with torch.device(device), default_dtype(dtype):
        if name == "sd3-medium":
            vae = AutoencoderKL(**FLOW_VAE, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609)
            model = _full_size(SD3Model, SD3Transformer2DModel(**SD3_MEDIUM), vae, sd3_scheduler())
        else:
            vae = AutoencoderKL(**FLOW_VAE, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159)
            model = _full_size(FluxModel, FluxTransformer2DModel(**FLUX_DEV), vae, flux_scheduler())
    for module in (model.transformer, model.vae):
        module.requires_grad_(False).eval()
    return model


STACKS = ("sd3-medium", "flux-dev", "tiny-sd3", "tiny-flux")
GUIDANCE = {"sd3-medium": 7.0, "flux-dev": 3.5, "tiny-sd3": 7.0, "tiny-flux": 3.5}  # the pipelines' defaults


def embeddings(model: FlowModel, seed: int) -> XLConditioning:
    """Random prompt embeddings of the pipeline's shapes (SD3: CLIP 77 + T5 tokens; FLUX: T5 tokens)."""
    config = model.transformer.config
    tokens = model.max_sequence_length + (0 if model.packs_latents else 77)
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, tokens, config.joint_attention_dim, generator=generator)
    pooled = torch.randn(1, config.pooled_projection_dim, generator=generator)
    return XLConditioning(hidden, pooled).to(model.transformer.device, model.transformer.dtype)


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float | None]:
    """(best seconds of ``repeats`` runs of ``fn``, peak allocated GiB on a GPU or None)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, (torch.cuda.max_memory_allocated(device) / GIB if cuda else None)


def plain_call(model: FlowModel, latents: torch.Tensor, cond: XLConditioning, uncond: XLConditioning, size: int,
               steps: int, guidance: float, true_cfg: float) -> torch.Tensor:
    """The diffusers pipeline on the same latents and embeddings (no gradient)."""
    kwargs = dict(prompt_embeds=cond.hidden, pooled_prompt_embeds=cond.pooled, negative_prompt_embeds=uncond.hidden,
                  negative_pooled_prompt_embeds=uncond.pooled, height=size, width=size, num_inference_steps=steps,
                  guidance_scale=guidance, output_type="pt")
    sampler = FlowSampler(model, steps, guidance, true_cfg_scale=true_cfg)
    if model.packs_latents:
        kwargs["true_cfg_scale"] = true_cfg
    with torch.no_grad():
        return model.pipeline()(latents=sampler.pack(latents).to(model.transformer.dtype), **kwargs).images


def measure(model: FlowModel, modes: dict[str, GradientMode], size: int, steps: int, guidance: float,
            true_cfg: float = 1.0, repeats: int = 1) -> list[tuple[str, float | None, float | None]]:
    """``(mode, seconds or None for OOM, peak GiB or None)`` for each mode and, last, ``"plain pipeline call"``."""
    device = model.transformer.device
    cond, uncond = embeddings(model, 0), embeddings(model, 1)
    latents = torch.randn(1, *model.latent_shape(size, size), generator=torch.Generator().manual_seed(0)).to(device)
    rows: list[tuple[str, float | None, float | None]] = []
    for label, mode in modes.items():
        sampler = FlowSampler(model, steps, guidance, mode, true_cfg_scale=true_cfg)

        def iteration(sampler: FlowSampler = sampler) -> None:
            z = latents.clone().requires_grad_(True)
            sampler(z, cond, uncond).float().mean().backward()

        try:
            rows.append((label, *_timed(iteration, device, repeats)))
        except torch.cuda.OutOfMemoryError:
            rows.append((label, None, None))
    rows.append(("plain pipeline call", *_timed(
        lambda: plain_call(model, latents, cond, uncond, size, steps, guidance, true_cfg), device, repeats)))
    return rows


def measured_table(name: str, size: int, rows: list[tuple[str, float | None, float | None]]) -> list[str]:
    """Markdown rows ``| model | px | mode | s per iteration | peak GiB | iteration / plain call |``."""
    plain = rows[-1][1]
    out = []
    for label, seconds, peak in rows:
        if seconds is None:
            cells = ["OOM"] * 3
        else:
            cells = [f"{seconds:.2f}", "-" if peak is None else f"{peak:.2f}", f"{seconds / plain:.2f}"]
        out.append(f"| {name} | {size} | {label} | {' | '.join(cells)} |")
    return out
