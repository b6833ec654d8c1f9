"""The differentiable denoising loop (latents + prompt embeddings -> image) and its gradient modes.

The forward value is always the model's real output: for the same latents, embeddings, scheduler,
steps and guidance it equals diffusers' ``StableDiffusionPipeline(..., output_type="pt")`` (for an SDXL model,
``StableDiffusionXLPipeline``: the pooled text embeddings of :class:`~sage_lightning.text.XLConditioning` and
the model's ``add_time_ids`` go to the UNet as ``added_cond_kwargs``).
What the gradient modes change is only which steps keep an autograd graph:

* ``FullGradient``: exact gradient through every step (optional per-step activation checkpointing).
* ``LastKGradient``: graph through the last ``k`` steps; the initial latent reaches the first graphed
  step through an identity skip (``x <- x + (z - z.detach())``).
* ``ResidualGradient``: SAGE's residual approximation (METHOD.md, "Latent-space search"): at step ``k``,
  ``x_k <- x_k + w * (z - z.detach())`` (zero in value), so ``dL/dz = w * dL/dx_k``; steps before ``k``
  run without a graph, steps after with one.

Precision: the loop runs in the latents' dtype (the search variables stay float32); only what enters
a frozen model (UNet input and text embeddings, VAE input) is cast to that model's dtype, and its
output cast back, so a float16/bfloat16 model works and gradients flow back to the float32 variables.
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from sage_lightning.cost import SamplingCost, guidance_branches
from sage_lightning.errors import SageError
from sage_lightning.models import DiffusionModel
from sage_lightning.text import XLConditioning, split_conditioning


class GradientMode:
    """Which denoising steps keep a graph. ``checkpoint``: recompute UNet activations in backward.
    ``decoder_checkpoint``: recompute the VAE decoder's activations block by block in backward (what a
    1024 px SDXL image needs; same values and gradients).

    Plain classes (not dataclasses) so that configs pick one by ``class_path``.
    """

    def __init__(self, checkpoint: bool = False, decoder_checkpoint: bool = False) -> None:
        self.checkpoint, self.decoder_checkpoint = checkpoint, decoder_checkpoint

    def graph_start(self, num_steps: int) -> int:
        """Index of the first step that runs with an autograd graph (``num_steps``: the scheduler's own
        timestep count, :func:`loop_length`)."""
        return 0

    def graphed_steps(self, num_steps: int) -> int:
        """Steps that keep a graph, each a backward through the UNet (``num_steps`` as in ``graph_start``)."""
        return num_steps - self.graph_start(num_steps)

    def skip_weight(self) -> float | None:
        """Weight of the skip from the initial latent to the first graphed step (None: no skip)."""
        return None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)


class FullGradient(GradientMode):
    """Exact gradient through the whole chain."""


class LastKGradient(GradientMode):
    """Graph through the last ``k`` steps; identity skip from the initial latent to step ``N - k``."""

    def __init__(self, k: int = 5, checkpoint: bool = False, decoder_checkpoint: bool = False) -> None:
        super().__init__(checkpoint, decoder_checkpoint)
        if k < 1:
            raise SageError(f"LastKGradient k={k} must be at least 1")
        self.k = k

    def graph_start(self, num_steps: int) -> int:
        return max(num_steps - self.k, 0)

    def skip_weight(self) -> float | None:
        return 1.0


class ResidualGradient(GradientMode):
    """SAGE's residual connection from the initial latent to intermediate step ``step``, weight ``weight``.

    ``step``: a step index (int >= 0) or a fraction of the steps (float in [0, 1)). A fraction ``w`` of
    ``N`` steps starts the graph at step ``floor(w * N)`` (floor, never round-half-to-even: 25 steps graph
    13, 27 graph 14), so at least the share ``1 - w`` of the steps keeps a graph. ``weight`` must be a finite
    number > 0: 0 would give every latent a zero gradient (a search that never moves), a negative weight turns
    the sign step into ascent.
    """

    def __init__(
        self, step: int | float = 0.5, weight: float = 1.0, checkpoint: bool = False, decoder_checkpoint: bool = False
    ) -> None:
        super().__init__(checkpoint, decoder_checkpoint)
        if step < 0 or (isinstance(step, float) and step >= 1):
            raise SageError(f"ResidualGradient step={step} must be an index >= 0 or a fraction in [0, 1)")
        if not (math.isfinite(weight) and weight > 0):
            raise SageError(
                f"ResidualGradient weight={weight} must be a finite number > 0 (0 stalls the search, a negative "
                "weight climbs the loss)"
            )
        self.step, self.weight = step, weight

    def graph_start(self, num_steps: int) -> int:
        if isinstance(self.step, float):
            index = math.floor(self.step * num_steps + 1e-9)  # + 1e-9: 0.29 * 100 = 28.999999999999996 is 29
        else:
            index = int(self.step)
        return min(index, num_steps - 1)

    def skip_weight(self) -> float | None:
        return self.weight


NoiseGenerator = torch.Generator | list[torch.Generator] | None


def loop_length(scheduler: SchedulerMixin, num_steps: int) -> int:
    """UNet calls per image (per guidance branch) of ``scheduler`` at ``num_steps``: its own timestep count."""
    fresh = type(scheduler).from_config(scheduler.config)
    if fresh.config.get("use_dynamic_shifting"):  # flow matching (FLUX): one Euler step per timestep, whatever mu
        return num_steps
    fresh.set_timesteps(num_steps, device="cpu")
    return len(fresh.timesteps)


def draws_noise(scheduler: SchedulerMixin, eta: float = 0.0) -> bool:
    """Whether ``scheduler.step`` adds fresh noise: ancestral and SDE solvers, DDPM, DDIM with ``eta > 0``."""
    name = type(scheduler).__name__
    if name == "DDIMScheduler":
        return eta > 0
    if name.startswith("DPMSolver"):
        return str(scheduler.config.get("algorithm_type", "")).startswith("sde")
    return name in ("EulerAncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DDPMScheduler")


class DiffusionSampler:
    """Generate images ``[B, 3, H, W]`` in [0, 1] from initial latents ``[B, C, h, w]`` and text embeddings.

    ``cond``: ``[B, L, D]`` (or ``[1, L, D]``, broadcast); ``uncond``: same, needed when guidance > 1.
    Stateless between calls: every call sets up a fresh copy of the scheduler.
    """

    def __init__(
        self,
        model: DiffusionModel,
        num_steps: int = 50,
        guidance_scale: float = 7.5,
        grad_mode: GradientMode | None = None,
        eta: float = 0.0,
    ) -> None:
        if num_steps < 1:
            raise SageError(f"num_steps={num_steps} must be at least 1")
        if guidance_scale < 0:
            raise SageError(f"guidance_scale={guidance_scale} must be >= 0 (1 or less disables guidance)")
        self.model = model
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale
        self.grad_mode = grad_mode or FullGradient()
        self.eta = eta

    @property
    def guided(self) -> bool:
        """Classifier-free guidance on (as diffusers: guidance_scale > 1)."""
        return guidance_branches(self.guidance_scale) > 1

    @property
    def cost(self) -> SamplingCost:
        """What one image of this sampler costs (:mod:`sage_lightning.cost`)."""
        return SamplingCost.of(self.loop_length, self.guidance_scale, self.grad_mode)

    def unet_evaluations(self, batch_size: int) -> int:
        """UNet forward evaluations of one call (conditional and unconditional counted apart)."""
        return batch_size * self.cost.image()

    @property
    def loop_length(self) -> int:
        """Denoising steps the scheduler really runs for ``num_steps`` (PNDM runs more: its PRK/PLMS warm-up)."""
        return loop_length(self.model.scheduler, self.num_steps)

    def graphed_steps(self) -> int:
        """Steps that keep an autograd graph (each costs a backward through the UNet)."""
        return self.cost.graphed_steps

    def fresh_scheduler(self, device: torch.device):
        scheduler = type(self.model.scheduler).from_config(self.model.scheduler.config)
        scheduler.set_timesteps(self.num_steps, device=device)
        if self.model.sets_begin_index and hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)  # as StableDiffusionXLPipeline does (SD 1.x's pipeline does not)
        return scheduler

    @property
    def draws_noise(self) -> bool:
        """Whether each step adds fresh noise (ancestral/SDE solvers, DDIM with eta > 0)."""
        return draws_noise(self.model.scheduler, self.eta)

    def _step_kwargs(self, scheduler, generator: NoiseGenerator) -> dict:
        accepted = set(inspect.signature(scheduler.step).parameters)
        kwargs = {"eta": self.eta} if "eta" in accepted else {}
        if "generator" in accepted:
            kwargs["generator"] = generator
        return kwargs

    def _added_conditions(self, pooled: Tensor | None, rows: int) -> dict | None:
        """SDXL's ``added_cond_kwargs``: the pooled text embeddings and the micro-conditioning ``time_ids``."""
        if pooled is None:
            return None
        dtype = self.model.unet.dtype
        time_ids = self.model.add_time_ids().to(pooled.device, dtype).repeat(rows, 1)
        return {"text_embeds": pooled.to(dtype), "time_ids": time_ids}

    def _noise_prediction(self, x: Tensor, t: Tensor, embeddings: Tensor, pooled: Tensor | None = None) -> Tensor:
        """The UNet's (guided) prediction in ``x``'s dtype; its inputs are cast to the UNet's own dtype."""
        dtype = self.model.unet.dtype
        added = self._added_conditions(pooled, x.shape[0])
        out = self.model.unet(
            x.to(dtype), t, encoder_hidden_states=embeddings.to(dtype), added_cond_kwargs=added, return_dict=False
        )[0]
        out = out.to(x.dtype)  # the loop (and the search variables) keep their own precision
        if self.guided:
            uncond, cond = out.chunk(2)
            out = uncond + self.guidance_scale * (cond - uncond)
        return out

    def _guided_eps(
        self, scheduler, x: Tensor, t: Tensor, embeddings: tuple[Tensor, Tensor | None], use_checkpoint: bool
    ) -> Tensor:
        model_input = torch.cat([x, x]) if self.guided else x
        model_input = scheduler.scale_model_input(model_input, t)
        inputs = [e for e in (model_input, *embeddings) if e is not None]
        needs_graph = torch.is_grad_enabled() and any(e.requires_grad for e in inputs)
        if use_checkpoint and needs_graph:
            return activation_checkpoint(self._noise_prediction, model_input, t, *embeddings, use_reentrant=True)
        return self._noise_prediction(model_input, t, *embeddings)

    def _embeddings(
        self, cond: Tensor | XLConditioning, uncond: Tensor | XLConditioning | None, batch: int
    ) -> tuple[Tensor, Tensor | None]:
        """``(encoder hidden states, pooled embeddings or None)`` for the UNet: ``[uncond; cond]`` when guided."""
        xl = getattr(self.model, "text_encoder_2", None) is not None
        if xl != isinstance(cond, XLConditioning):
            want = "XLConditioning (text.XLPromptEncoder)" if xl else "a tensor (text.PromptEncoder)"
            raise SageError(f"{type(self.model).__name__} takes {want} as prompt embeddings, got {type(cond).__name__}")
        parts = [_rows(p, batch) if p is not None else None for p in split_conditioning(cond)]
        if not self.guided:
            return parts[0], parts[1]
        if uncond is None:
            raise SageError("guidance_scale > 1 needs unconditional embeddings: pass uncond")
        negative = split_conditioning(uncond)
        hidden, pooled = (
            None if p is None else torch.cat([_rows(n.to(p.dtype), batch), p])
            for p, n in zip(parts, negative, strict=True)
        )
        return hidden, pooled

    def denoise(
        self, latents: Tensor, cond: Tensor, uncond: Tensor | None = None, generator: NoiseGenerator = None
    ) -> Tensor:
        """Run the denoising loop from initial latents ``z``; returns the final latents.

        ``generator``: one ``torch.Generator`` per row (or one for the batch), passed to every
        ``scheduler.step`` as diffusers' pipeline passes its ``generator``; required when the scheduler
        draws noise, so no draw ever comes from the global random state.
        """
        if generator is None and self.draws_noise:
            raise SageError(
                f"{type(self.model.scheduler).__name__} draws noise at every step: pass one torch.Generator "
                "per row (generator=...), e.g. from sage_lightning.targets.noise_generator"
            )
        scheduler = self.fresh_scheduler(latents.device)
        embeddings = self._embeddings(cond, uncond, latents.shape[0])
        step_kwargs = self._step_kwargs(scheduler, generator)
        mode = self.grad_mode
        start, weight = mode.graph_start(len(scheduler.timesteps)), mode.skip_weight()
        grad_on = torch.is_grad_enabled()
        x = latents * scheduler.init_noise_sigma
        for i, t in enumerate(scheduler.timesteps):
            if i == start and weight is not None:
                x = x.detach() + weight * (latents - latents.detach())
            with torch.set_grad_enabled(grad_on and i >= start):
                eps = self._guided_eps(scheduler, x, t, embeddings, mode.checkpoint)
                x = scheduler.step(eps, t, x, **step_kwargs, return_dict=False)[0]
        return x

    def decode(self, latents: Tensor) -> Tensor:
        """VAE decode to images in [0, 1] (as the pipeline's ``output_type="pt"``), in ``latents``' dtype.

        Latents are unscaled as the pipelines do (SDXL-style VAEs with ``latents_mean``/``latents_std`` too);
        the decoder runs in the VAE's own dtype (float32 for a ``force_upcast`` VAE in a float16 SDXL model,
        see ``DiffusionXLModel.keeps_float32``); ``decoder_checkpoint`` recomputes its blocks in backward."""
        vae = self.model.vae
        mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
        if mean is not None and std is not None:
            view = (1, -1, 1, 1)
            mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(view)
            std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(view)
            scaled = latents * std / vae.config.scaling_factor + mean
        else:
            scaled = latents / vae.config.scaling_factor
        return decode_to_images(vae, scaled, self.grad_mode, latents.dtype)

    def __call__(
        self, latents: Tensor, cond: Tensor, uncond: Tensor | None = None, generator: NoiseGenerator = None
    ) -> Tensor:
        return self.decode(self.denoise(latents, cond, uncond, generator))


def _rows(tensor: Tensor, batch: int) -> Tensor:
    """``tensor`` with ``batch`` rows: one row is broadcast, ``batch`` rows are kept, anything else refused."""
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    if tensor.shape[0] != batch:
        raise SageError(f"{tensor.shape[0]} prompt embeddings for {batch} latents: give 1 or {batch}")
    return tensor


def _reentrant_checkpoint(module, *args):
    """diffusers' per-block checkpoint function, reentrant: memory stays flat (STACK_NOTES.md)."""
    return activation_checkpoint(module.__call__, *args, use_reentrant=True)


def decode_to_images(vae, scaled: Tensor, grad_mode: GradientMode, dtype: torch.dtype) -> Tensor:
    """Images ``[B, 3, H, W]`` in [0, 1] (``dtype``) from the VAE's input ``scaled`` (latents already unscaled as
    the pipeline does), decoded in the VAE's own dtype; the decoder's blocks checkpointed when ``grad_mode`` asks
    (``decoder_checkpoint``) and a gradient flows."""
    checkpointed = getattr(grad_mode, "decoder_checkpoint", False) and torch.is_grad_enabled()
    with block_checkpointing(vae, checkpointed and scaled.requires_grad):
        image = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
    return (image.to(dtype) / 2 + 0.5).clamp(0, 1)


@contextmanager
def block_checkpointing(model, enabled: bool):
    """Checkpoint the blocks of a diffusers model for one call: the VAE decoder's mid and up blocks, a flow
    transformer's joint and single blocks (diffusers' own gradient checkpointing, reentrant, switched off again
    after, so the shared frozen model is left as it was)."""
    if not enabled:
        yield
        return
    model.enable_gradient_checkpointing(_reentrant_checkpoint)
    try:
        yield
    finally:
        model.disable_gradient_checkpointing()
