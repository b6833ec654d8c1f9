"""The differentiable flow-matching sampler of SD3 and FLUX (initial noise + prompt embeddings -> image).

The forward value is the model's real output: for the same initial latents, embeddings, steps and guidance it
equals ``StableDiffusion3Pipeline`` / ``FluxPipeline`` (``output_type="pt"``). As the pipelines do, the sampler

* sets up a fresh ``FlowMatchEulerDiscreteScheduler`` per call: static shift (SD3), or dynamic shifting by the
  image-size dependent ``mu`` (FLUX always, with sigmas ``linspace(1, 1/N, N)``; SD3 when its config says
  ``use_dynamic_shifting``), then ``set_begin_index(0)``;
* SD3: classifier-free guidance with the negative and positive branches batched in one transformer call,
  ``v = v_neg + s * (v_pos - v_neg)`` (on when ``guidance_scale > 1``);
* FLUX: the distilled guidance embedding (``guidance_scale``, when ``transformer.config.guidance_embeds``), the
  optional true CFG (``true_cfg_scale > 1`` with negative embeddings: a second transformer call), the 2x2
  latent packing and the image / text position ids.

The search variable is the initial latent in its unpacked shape ``[B, C, h, w]`` (FLUX packs it inside). The
gradient modes are :mod:`sage_lightning.sampler`'s: ``FullGradient`` (exact), ``LastKGradient`` (exact through the
last ``k`` Euler steps, identity skip from the initial noise), ``ResidualGradient`` (SAGE's residual shortcut on the
flow ODE: ``x_k <- x_k + w (z - z.detach())`` at step ``k``, so ``dL/dz = w dL/dx_k``); ``checkpoint`` recomputes
the transformer block by block in backward (diffusers' gradient checkpointing of its joint / single blocks, each
keeping only its inputs), ``decoder_checkpoint`` the VAE decoder's blocks.
Only the model inputs are cast to the model's dtype; the loop keeps the latents' dtype.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from torch import Tensor

from sage_lightning.cost import SamplingCost
from sage_lightning.errors import SageError
from sage_lightning.flow_models.encoder import FlowPromptEncoder
from sage_lightning.flow_models.load import flow_family
from sage_lightning.flow_models.records import FlowModel, FluxModel
from sage_lightning.sampler import (
    DiffusionSampler,
    FullGradient,
    GradientMode,
    _rows,
    block_checkpointing,
    decode_to_images,
)
from sage_lightning.text import XLConditioning, prompt_encoder, split_conditioning


class FlowSampler:
    """Generate images ``[B, 3, H, W]`` in [0, 1] from initial latents ``[B, C, h, w]`` and prompt embeddings
    (:class:`~sage_lightning.text.XLConditioning`: ``hidden`` ``[B or 1, L, D]``, ``pooled`` ``[B or 1, P]``).

    ``guidance_scale``: SD3's classifier-free guidance scale; FLUX's embedded guidance (ignored by a model without
    a guidance embedding, as schnell). ``true_cfg_scale``: FLUX's true classifier-free guidance (SD3: unused).
    Stateless between calls.
    """

    def __init__(
        self,
        model: FlowModel,
        num_steps: int = 28,
        guidance_scale: float = 7.0,
        grad_mode: GradientMode | None = None,
        true_cfg_scale: float = 1.0,
    ) -> None:
        if num_steps < 1:
            raise SageError(f"num_steps={num_steps} must be at least 1")
        if guidance_scale < 0 or true_cfg_scale < 0:
            raise SageError(f"guidance_scale={guidance_scale} and true_cfg_scale={true_cfg_scale} must be >= 0")
        self.model, self.num_steps, self.guidance_scale = model, num_steps, guidance_scale
        self.true_cfg_scale = true_cfg_scale
        self.grad_mode = grad_mode or FullGradient()

    # ------------------------------------------------------------------------------------------ bookkeeping
    @property
    def guided(self) -> bool:
        """Whether each step also runs the negative branch (SD3: guidance_scale > 1; FLUX: true_cfg_scale > 1)."""
        return (self.true_cfg_scale if self.model.packs_latents else self.guidance_scale) > 1.0

    @property
    def loop_length(self) -> int:
        """Euler steps per image: ``num_steps`` (a first-order scheduler)."""
        return self.num_steps

    @property
    def draws_noise(self) -> bool:
        return False  # stochastic_sampling is refused when the model loads

    @property
    def cost(self) -> SamplingCost:
        """What one image costs, in transformer calls (:mod:`sage_lightning.cost`; a call counted as a UNet's)."""
        mode = self.grad_mode
        return SamplingCost(self.loop_length, 2 if self.guided else 1, mode.graphed_steps(self.loop_length),
                            bool(mode.checkpoint))

    def graphed_steps(self) -> int:
        return self.cost.graphed_steps

    def fresh_scheduler(self, height: int, width: int, device: torch.device) -> FlowMatchEulerDiscreteScheduler:
        """The pipeline's timestep set-up for a latent of ``height`` x ``width`` (unpacked)."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.model.scheduler.config)
        config, n = scheduler.config, self.num_steps
        if self.model.packs_latents:  # FluxPipeline: sigmas given, mu from the packed sequence length
            sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / n, n)
            mu = calculate_shift((height // 2) * (width // 2), config.get("base_image_seq_len", 256),
                                 config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                 config.get("max_shift", 1.15))
            if sigmas is None:
                scheduler.set_timesteps(n, device=device, mu=mu)
            else:
                scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
        elif config.get("use_dynamic_shifting"):  # StableDiffusion3Pipeline with a dynamic-shifting scheduler
            patch = self.model.transformer.config.patch_size
            mu = calculate_shift((height // patch) * (width // patch), config.get("base_image_seq_len", 256),
                                 config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                 config.get("max_shift", 1.16))
            scheduler.set_timesteps(n, device=device, mu=mu)
        else:
            scheduler.set_timesteps(n, device=device)
        scheduler.set_begin_index(0)
        return scheduler

    # ------------------------------------------------------------------------------------------ velocity
    def _sd3_velocity(self, x: Tensor, t: Tensor, hidden: Tensor, pooled: Tensor) -> Tensor:
        """SD3's (guided) velocity: both branches in one batched call ``[negative; positive]``."""
        transformer = self.model.transformer
        model_input = torch.cat([x, x]) if self.guided else x
        out = transformer(
            hidden_states=model_input.to(transformer.dtype), timestep=t.expand(model_input.shape[0]),
            encoder_hidden_states=hidden.to(transformer.dtype), pooled_projections=pooled.to(transformer.dtype),
            return_dict=False,
        )[0].to(x.dtype)
        if self.guided:
            negative, positive = out.chunk(2)
            out = negative + self.guidance_scale * (positive - negative)
        return out

    def _flux_call(self, x: Tensor, t: Tensor, hidden: Tensor, pooled: Tensor, img_ids: Tensor) -> Tensor:
        transformer = self.model.transformer
        dtype, rows = transformer.dtype, x.shape[0]
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full([1], self.guidance_scale, device=x.device, dtype=torch.float32).expand(rows)
        txt_ids = torch.zeros(hidden.shape[1], 3, device=x.device, dtype=dtype)
        return transformer(
            hidden_states=x.to(dtype), timestep=t.expand(rows).to(dtype) / 1000, guidance=guidance,
            pooled_projections=pooled.to(dtype), encoder_hidden_states=hidden.to(dtype), txt_ids=txt_ids,
            img_ids=img_ids, return_dict=False,
        )[0].to(x.dtype)

    def _flux_velocity(self, x: Tensor, t: Tensor, img_ids: Tensor, *embeddings: Tensor) -> Tensor:
        """FLUX's velocity on packed latents; with true CFG a second call on the negative embeddings."""
        out = self._flux_call(x, t, embeddings[0], embeddings[1], img_ids)
        if self.guided:
            negative = self._flux_call(x, t, embeddings[2], embeddings[3], img_ids)
            out = negative + self.true_cfg_scale * (out - negative)
        return out

    def _velocity(self, x: Tensor, t: Tensor, inputs: tuple[Tensor, ...], use_checkpoint: bool) -> Tensor:
        """One step's velocity; ``checkpoint``: each transformer block (SD3's joint blocks, FLUX's double and
        single blocks) keeps only its inputs and is recomputed in backward, in every branch."""
        fn = self._flux_velocity if self.model.packs_latents else self._sd3_velocity
        needs_graph = torch.is_grad_enabled() and any(e.requires_grad for e in (x, *inputs))
        with block_checkpointing(self.model.transformer, use_checkpoint and needs_graph):
            return fn(x, t, *inputs)

    def _inputs(self, cond: XLConditioning, uncond: XLConditioning | None, batch: int, h: int, w: int, device):
        """What every velocity call takes besides ``x`` and ``t``: SD3 ``(hidden, pooled)`` (``[neg; pos]`` when
        guided); FLUX ``(img_ids, hidden, pooled[, neg hidden, neg pooled])``."""
        if not isinstance(cond, XLConditioning):
            raise SageError(f"{type(self.model).__name__} takes XLConditioning prompt embeddings, got "
                            f"{type(cond).__name__}")
        parts = [_rows(p, batch) for p in split_conditioning(cond)]
        negative: list[Tensor] = []
        if self.guided:
            if uncond is None:
                raise SageError("guidance needs negative prompt embeddings: pass uncond (e.g. model.unconditional())")
            negative = [_rows(n.to(p.dtype), batch) for n, p in zip(split_conditioning(uncond), parts, strict=True)]
        if not self.model.packs_latents:
            return tuple(torch.cat([n, p]) for n, p in zip(negative, parts, strict=True)) if negative else tuple(parts)
        img_ids = FluxPipeline._prepare_latent_image_ids(batch, h // 2, w // 2, device, self.model.transformer.dtype)
        return (img_ids, *parts, *negative)

    # ------------------------------------------------------------------------------------------ loop
    def pack(self, latents: Tensor) -> Tensor:
        """The loop's form of ``[B, C, h, w]`` latents (FLUX: ``[B, h/2 * w/2, 4C]``)."""
        if not self.model.packs_latents:
            return latents
        b, c, h, w = latents.shape
        if h % 2 or w % 2:
            raise SageError(f"FLUX latents must have an even height and width, got {h}x{w}")
        return FluxPipeline._pack_latents(latents, b, c, h, w)

    def unpack(self, x: Tensor, height: int, width: int) -> Tensor:
        if not self.model.packs_latents:
            return x
        factor = self.model.vae_scale_factor
        return FluxPipeline._unpack_latents(x, height * factor, width * factor, factor)

    def denoise(self, latents: Tensor, cond: XLConditioning, uncond: XLConditioning | None = None,
                generator=None) -> Tensor:
        """Integrate the flow ODE from initial latents ``[B, C, h, w]``; returns the final latents, same shape.
        ``generator`` is accepted for the UNet sampler's interface and unused (no step draws noise)."""
        b, _, h, w = latents.shape
        scheduler = self.fresh_scheduler(h, w, latents.device)
        inputs = self._inputs(cond, uncond, b, h, w, latents.device)
        mode = self.grad_mode
        start, weight = mode.graph_start(len(scheduler.timesteps)), mode.skip_weight()
        grad_on = torch.is_grad_enabled()
        packed = self.pack(latents)
        x = packed
        for i, t in enumerate(scheduler.timesteps):
            if i == start and weight is not None:
                x = x.detach() + weight * (packed - packed.detach())
            with torch.set_grad_enabled(grad_on and i >= start):
                v = self._velocity(x, t, inputs, mode.checkpoint)
                x = scheduler.step(v, t, x, return_dict=False)[0]
        return self.unpack(x, h, w)

    def decode(self, latents: Tensor) -> Tensor:
        """VAE decode of ``[B, C, h, w]`` latents to images in [0, 1] (the pipelines' unscale and shift)."""
        return decode_to_images(self.model.vae, self.model.vae_input(latents), self.grad_mode, latents.dtype)

    def __call__(self, latents: Tensor, cond: XLConditioning, uncond: XLConditioning | None = None,
                 generator=None) -> Tensor:
        return self.decode(self.denoise(latents, cond, uncond))


def check_true_cfg(flux: bool, true_cfg_scale: float) -> None:
    """SageError when ``true_cfg_scale`` is set (not 1) on a model other than FLUX."""
    if true_cfg_scale != 1.0 and not flux:
        raise SageError(f"true_cfg_scale={true_cfg_scale} is FLUX's true classifier-free guidance: leave it at 1 on "
                        "other models (their guidance_scale runs the negative branch)")


def sampler_for(model, num_steps: int, guidance_scale: float, grad_mode: GradientMode | None, eta: float = 0.0,
                true_cfg_scale: float = 1.0):
    """The sampler of ``model``: :class:`FlowSampler` for SD3 / FLUX, else the UNet's ``DiffusionSampler``.
    ``true_cfg_scale``: FLUX's true CFG (:func:`check_true_cfg`)."""
    check_true_cfg(isinstance(model, FluxModel), true_cfg_scale)
    if isinstance(model, FlowModel):
        if eta:
            raise SageError(f"eta={eta}: the flow-matching sampler is deterministic, set eta to 0")
        return FlowSampler(model, num_steps, guidance_scale, grad_mode, true_cfg_scale)
    return DiffusionSampler(model, num_steps, guidance_scale, grad_mode, eta)


def latent_shape_of(model) -> tuple[int, int, int]:
    """``[C, h, w]`` of one initial latent at the model's default image size (FLUX: unpacked)."""
    if isinstance(model, FlowModel):
        return model.latent_shape()
    unet = model.unet
    return (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)


def encoder_for(model):
    """The prompt encoder of ``model``: SD3 / FLUX encode as their pipeline does (:class:`FlowPromptEncoder`), a
    UNet model through :func:`sage_lightning.text.prompt_encoder`."""
    return FlowPromptEncoder(model) if isinstance(model, FlowModel) else prompt_encoder(model)


def search_cost(source: str, loop_length: int, guidance_scale: float, grad_mode: GradientMode,
                local_files_only: bool = False, true_cfg_scale: float = 1.0) -> SamplingCost:
    """The cost model of a search's sampling settings, before any weights load. FLUX's ``guidance_scale`` is its
    guidance embedding, inside its one transformer call a step; its true CFG (``true_cfg_scale > 1``) adds a second
    call on the negative prompt. Every other model runs a second, unconditional branch when ``guidance_scale > 1``
    (and refuses ``true_cfg_scale``)."""
    flux = flow_family(source, local_files_only) is FluxModel
    check_true_cfg(flux, true_cfg_scale)
    return SamplingCost.of(loop_length, true_cfg_scale if flux else guidance_scale, grad_mode)

