"""What every SAGE search over (class, prompt, seed) targets shares: frozen models and target states.

A target is *running* until the discriminator D declares a failure (*found*) or its iteration budget is
spent (*exhausted*). One epoch = one iteration for every running target; the datamodule asks
``running_targets()`` at each epoch start, so finished targets cost nothing more. Under DDP each rank
attacks its own targets and the state changes are summed across ranks after every step, so all ranks
agree on every target's state; the adversarial parameters are replicated and their gradients averaged
by DDP, which leaves the sign (the only thing a sign-gradient step uses) unchanged.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor

from sage_lightning.errors import SageError
from sage_lightning.loading import (
    TINY_SOURCES,
    DiffusionModel,
    DiffusionXLModel,
    check_source,
    load_diffusion,
    load_scheduler,
)
from sage_lightning.optim import SignSGD, check_lr
from sage_lightning.sampler import DiffusionSampler, GradientMode, ResidualGradient, loop_length
from sage_lightning.surrogate import ClassifierEnsemble, EnsembleOutput
from sage_lightning.surrogate.views import check_views
from sage_lightning.targets import Target, noise_generator
from sage_lightning.text import PromptEncoder, XLConditioning, XLPromptEncoder, prompt_encoder

RUNNING, FOUND, EXHAUSTED = 0, 1, 2
MAX_GUIDANCE = 100.0  # larger scales overflow float32 images into NaN
BACKWARD_FORWARDS = 2  # a backward through the UNet costs about two forwards (SAGE_METHOD.md)


@dataclass
class StepOutputs:
    """What one step produced, for the writer and the loggers (rows = real targets of this rank)."""

    targets: Tensor  # [b] target ids
    iterations: Tensor  # [b] updates applied before this evaluation
    images: Tensor  # [b, 3, H, W]
    latents: Tensor  # [b, C, h, w] the latents that produced the images
    output: EnsembleOutput  # sliced to the b real rows
    finished: Tensor  # [b] bool: found or exhausted at this evaluation
    found: Tensor  # [b] bool


class _Frozen:
    """Holds the frozen models outside the module tree: never checkpointed, moved, trained or DDP-synced."""

    def __init__(self, model: DiffusionModel, ensemble: ClassifierEnsemble, encoder: PromptEncoder | XLPromptEncoder):
        self.model, self.ensemble, self.encoder = model, ensemble, encoder

    def to(self, device: torch.device) -> None:
        self.model.to(device)
        self.ensemble.to(device)


def _default_ensemble(source: str) -> ClassifierEnsemble:
    from sage_lightning.loading import default_ensemble

    return default_ensemble(source)


PAPER_ITERATIONS = 100  # SAGE's pseudo-code: at most 100 sign-gradient iterations per target
CPU_WORLD_ITERATIONS = 20  # ShapesWorld and the tiny stack: a budget that runs in minutes on a CPU


def default_max_iterations(diffusion: str) -> int:
    """The iteration budget a model gets when its config names none: the paper's 100, except on the CPU worlds
    (``shapesworld``, ``tiny``, ``tiny-xl``), where 20 keeps a run to minutes on a CPU."""
    return CPU_WORLD_ITERATIONS if diffusion == "shapesworld" or diffusion in TINY_SOURCES else PAPER_ITERATIONS


LATENT_BOX = (-1.0, 1.0)  # SAGE_METHOD.md: the latent perturbation delta is clamped to [-1, 1]
EMBEDDING_BOX = (-2.5, 2.5)  # SAGE's pseudo-code: the prompt slots' (and the token's) embeddings in [-2.5, 2.5]


def clamp_constraint(box: tuple[float, float]) -> tuple[str, dict]:
    """The constraint that keeps the adversarial rows in ``box`` (``callbacks.ClampPerturbation``), for
    :meth:`TargetSearch.constraints`."""
    return "callbacks.clamp.ClampPerturbation", {"low": box[0], "high": box[1]}


def import_class(path: str) -> type:
    """The class at ``module.Name`` (a search names its callbacks this way: no import of an upper layer)."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


DIVERGED = ": the search diverged (lower lr or guidance_scale); the run stops before anything non-finite is written"


def raise_on_every_rank(problem: str, why: str = DIVERGED) -> None:
    """Collective: every rank calls it with its own ``problem`` ("" for none). If any rank has one, every rank
    raises the same SageError (the first problem in rank order, then ``why``), so no rank goes on alone, waits
    on the others or ends with another message."""
    first = next((p for p in all_gather_objects([problem]) if p), "")
    if first:
        raise SageError(f"{first}{why}")


def all_gather_objects(items: list) -> list:
    """Every rank's ``items`` concatenated, in rank order (``items`` itself without DDP)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list[list | None] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, items)
        return [item for part in everyone for item in (part or [])]
    return items


MICRO_CONDITIONING = ("original_size", "crops_coords_top_left", "target_size")


def check_micro_conditioning(given: dict | None) -> dict[str, tuple[int, int]]:
    """SDXL's ``micro_conditioning`` setting as pairs of non-negative integers; SageError naming a bad key or value."""
    checked: dict[str, tuple[int, int]] = {}
    for key, value in (given or {}).items():
        if key not in MICRO_CONDITIONING:
            raise SageError(f"micro_conditioning has no key {key!r}: use {', '.join(MICRO_CONDITIONING)}")
        pair = list(value) if isinstance(value, (list, tuple)) else [value]
        if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pair):
            raise SageError(f"micro_conditioning.{key}={value!r} must be two non-negative integers, e.g. [1024, 1024]")
        checked[key] = (pair[0], pair[1])
    return checked


def with_micro_conditioning(model: DiffusionModel, values: dict[str, tuple[int, int]]) -> DiffusionModel:
    """``model`` with SDXL's size conditioning set; SageError for a model without it (not SDXL)."""
    if not isinstance(model, DiffusionXLModel):
        raise SageError(f"micro_conditioning is SDXL's size conditioning; {model.name!r} is not an SDXL model: "
                        "remove micro_conditioning from the config")
    return dataclasses.replace(model, **values)


def target_class_indices(targets: list[Target], known: list[str]) -> list[int]:
    """Each target's class as an index into ``known``: the index it carries (never looked up by name: names can
    repeat), else its name resolved (SageError when the name is unknown or ambiguous)."""
    from sage_lightning.surrogate import resolve_classes

    return [t.class_index if t.class_index is not None else resolve_classes([t.class_name], known)[0]
            for t in targets]


class TargetSearch(L.LightningModule):
    """Base of the searches. Subclasses define the adversarial parameters and ``training_step``.

    A search names its result writer (``result_writer``), the callbacks its method needs
    (:meth:`method_callbacks`) and its constraints (:meth:`constraints`: the clamp box, the Gaussian shell) by
    class path; :meth:`configure_callbacks` adds those a run lacks, so the CLI and a plain ``Trainer`` get the same
    run folder and the same constrained search.

    Args:
        diffusion: model source for :func:`sage_lightning.loading.load_diffusion` (``shapesworld``,
            ``tiny``, a folder or a hub id).
        ensemble: the discriminator D; None takes the source's default ensemble.
        views: D's nuisance views (ours; :class:`~sage_lightning.surrogate.ClassifierEnsemble`); None keeps the
            ensemble's own (ShapesWorld's default D: six views; a config's ensemble: its ``views``).
        num_steps, guidance_scale, scheduler: sampling of the text-to-image model.
        eta: DDIM's eta (0: deterministic; > 0 adds noise at every step, drawn from each target's own
            generator, :func:`~sage_lightning.targets.noise_generator`).
        grad_mode: how gradients cross the denoising loop (default: SAGE's residual connection).
        max_iterations: attack iterations per target before it counts as exhausted; None: the model's
            default (:func:`default_max_iterations`: the paper's 100, or 20 on the CPU worlds).
        lr: step size of the default sign-gradient optimizer (a config ``optimizer:`` overrides it).
        micro_conditioning: SDXL's size conditioning (``add_time_ids``), any of ``original_size: [h, w]``,
            ``crops_coords_top_left: [top, left]``, ``target_size: [h, w]``, as ``StableDiffusionXLPipeline``'s
            arguments of those names; None (or a key left out): the pipeline's defaults (the image size, (0, 0)).
    """

    def __init__(
        self,
        diffusion: str = "shapesworld",
        ensemble: ClassifierEnsemble | None = None,
        num_steps: int = 20,
        guidance_scale: float = 3.0,
        scheduler: str = "ddim",
        grad_mode: GradientMode | None = None,
        max_iterations: int | None = None,
        lr: float = 0.05,
        dtype: str = "float32",
        local_files_only: bool = False,
        eta: float = 0.0,
        micro_conditioning: dict[str, list[int]] | None = None,
        views: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.views = None if views is None else check_views(views)
        self.micro_conditioning = check_micro_conditioning(micro_conditioning)
        if not 0.0 <= eta <= 1.0:
            raise SageError(f"eta={eta} must be in [0, 1] (DDIM: 0 is deterministic, 1 is DDPM-like)")
        self.eta = eta
        max_iterations = default_max_iterations(diffusion) if max_iterations is None else max_iterations
        if max_iterations < 0:
            raise SageError(f"max_iterations={max_iterations} must be >= 0")
        if num_steps < 1:
            raise SageError(f"num_steps={num_steps} must be at least 1")
        check_lr(lr)
        if not (math.isfinite(guidance_scale) and 0 <= guidance_scale <= MAX_GUIDANCE):
            raise SageError(
                f"guidance_scale={guidance_scale} must be in [0, {MAX_GUIDANCE:g}] (Stable Diffusion uses 7.5; "
                "1 or less disables guidance)"
            )
        self.diffusion_source, self.scheduler_name, self.dtype_name = diffusion, scheduler, dtype
        self.local_files_only = local_files_only
        self.num_steps, self.guidance_scale, self.max_iterations, self.lr = (
            num_steps,
            guidance_scale,
            max_iterations,
            lr,
        )
        self.grad_mode = grad_mode or ResidualGradient()
        # A plain attribute, not a submodule: a config-given D is never checkpointed, moved or DDP-synced.
        self.__dict__["_ensemble_arg"] = ensemble
        self._frozen: _Frozen | None = None
        self.targets: list[Target] = []
        self.step_outputs: StepOutputs | None = None
        self.stepped_targets = torch.zeros(0, dtype=torch.long)

    result_writer = "callbacks.failure_writer.FailureWriter"

    # ----------------------------------------------------------------------------------- set-up
    def method_callbacks(self) -> list[str]:
        """Class paths of the callbacks that are part of this search's method (beyond its writer)."""
        return []

    def constraints(self) -> list[tuple[str, dict]]:
        """The constraints on this search's adversarial parameters, as ``(callback class path, init args)``: each is
        added to a run that has none of its class, so a search used from Python is as constrained as from its
        config. A config changes one by listing its own (e.g. another clamp range); it cannot drop it."""
        return []

    def configure_callbacks(self):
        """The result writer, the constraints and the method's callbacks, each added when the run has none of its
        class (constraints before the method's callbacks: token snapping sees the clamped slots)."""
        have = list(self.trainer.callbacks) if self._trainer is not None else []
        needed = [(path, {}) for path in (self.result_writer,)] + self.constraints()
        needed += [(path, {}) for path in self.method_callbacks()]
        classes = [(import_class(path), args) for path, args in needed]
        return [cls(**args) for cls, args in classes if not any(isinstance(c, cls) for c in have)]

    @property
    def frozen(self) -> _Frozen:
        if self._frozen is None:
            raise RuntimeError("the search is not set up: call trainer.fit (or module.prepare(targets))")
        return self._frozen

    @property
    def sampler(self) -> DiffusionSampler:
        return DiffusionSampler(self.frozen.model, self.num_steps, self.guidance_scale, self.grad_mode, self.eta)

    @property
    def loop_length(self) -> int:
        """Denoising steps (UNet calls per branch) one image takes: the scheduler's own timestep count for
        ``num_steps`` (PNDM runs more), read from its config alone, so budgets need no model weights."""
        if self._frozen is not None:
            return loop_length(self.frozen.model.scheduler, self.num_steps)
        scheduler = load_scheduler(self.diffusion_source, self.scheduler_name, self.local_files_only)
        return loop_length(scheduler, self.num_steps)

    def prepare(self, targets_of) -> None:
        """Load the frozen models and build the targets; ``targets_of(class_names) -> list[Target]``."""
        if self._frozen is not None:
            return
        check_source(self.diffusion_source)  # a missing model folder is named before anything loads
        ensemble = self._ensemble_arg or _default_ensemble(self.diffusion_source)
        targets = targets_of(ensemble.class_names)  # bad classes fail here, before the model loads
        if not targets:
            raise SageError("the target list is empty: give at least one class in data.classes")
        model = load_diffusion(
            self.diffusion_source,
            scheduler=self.scheduler_name,
            dtype=self.dtype_name,
            local_files_only=self.local_files_only,
        )
        if self.micro_conditioning:
            model = with_micro_conditioning(model, self.micro_conditioning)
        ensemble.requires_grad_(False).eval()
        if self.views is not None:
            ensemble.views = self.views
        self._frozen = _Frozen(model, ensemble, prompt_encoder(model))
        self.targets = targets
        self.class_index = torch.tensor(target_class_indices(targets, ensemble.class_names))
        self.status = torch.zeros(len(targets), dtype=torch.long)
        self.iterations = torch.zeros(len(targets), dtype=torch.long)
        self.init_parameters()

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is None:
            raise SageError("a search needs a datamodule that supplies targets (data: in the config)")
        self.prepare(datamodule.targets)

    def on_fit_start(self) -> None:
        self.frozen.to(self.device)

    def init_parameters(self) -> None:
        """Create the adversarial parameters (the module's only trainable parameters)."""
        raise NotImplementedError

    def configure_optimizers(self):
        return SignSGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    # ------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def prompt_embeddings(self, prompts: list[str]) -> Tensor | XLConditioning:
        return self.frozen.encoder(prompts).to(self.device)

    @torch.no_grad()
    def unconditional_embeddings(self) -> Tensor | XLConditioning:
        """Classifier-free guidance's unconditional branch, as the model's pipeline makes it (SDXL: zeros)."""
        return self.frozen.encoder.unconditional().to(self.device)

    def generate(self, latents: Tensor, cond: Tensor, seeds: list[int] | None = None) -> Tensor:
        """Images of ``latents`` ``[B, C, h, w]``; ``seeds``: the seed each row's latent was drawn from, which
        also seeds that row's scheduler noise (:func:`~sage_lightning.targets.noise_generator`; a scheduler
        that draws noise refuses to run without them)."""
        sampler = self.sampler
        uncond = self.unconditional_embeddings() if sampler.guided else None
        generators = None
        if seeds is not None and sampler.draws_noise:
            if len(seeds) != latents.shape[0]:
                raise ValueError(f"{len(seeds)} noise seeds for {latents.shape[0]} latents")
            generators = [noise_generator(s, tuple(latents.shape[1:])) for s in seeds]
        return sampler(latents, cond, uncond, generators)

    def unet_evaluations(self, iterations: int) -> int:
        """UNet evaluations a target used: forward calls of ``iterations + 1`` evaluations, plus one
        backward call per graphed step of each of the ``iterations`` updates (cond/uncond apart)."""
        sampler = self.sampler
        forward = sampler.unet_evaluations(1)
        graphed = sampler.graphed_steps()
        backward = graphed * (2 if sampler.guided else 1) * (2 if self.grad_mode.checkpoint else 1)
        return (iterations + 1) * forward + iterations * backward

    def forward_equivalents(self, iterations: int) -> int:
        """Compute a latent-search target used after ``iterations`` updates, in forward-equivalents.

        SAGE_METHOD.md's unit: a UNet forward = 1, a backward through it = :data:`BACKWARD_FORWARDS`, a
        checkpointed recompute = 1 more. ``iterations + 1`` sampling calls of ``loop_length`` forwards (x2 with
        guidance), plus per update a backward through every graphed step. Needs no model weights (only the
        sampling settings and the scheduler's config), so a baseline can size its budget from it before anything loads.
        """
        calls = 2 if self.guidance_scale > 1.0 else 1
        forward = self.loop_length * calls
        graphed = self.grad_mode.graphed_steps(self.loop_length) * calls
        backward = graphed * (BACKWARD_FORWARDS + (1 if self.grad_mode.checkpoint else 0))
        return (iterations + 1) * forward + iterations * backward

    # --------------------------------------------------------------------------- target states
    def running_targets(self) -> list[int]:
        return torch.nonzero(self.status == RUNNING).flatten().tolist()

    def _all_ranks_sum(self, tensor: Tensor) -> Tensor:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            tensor = tensor.to(self.device)
            dist.all_reduce(tensor)
        return tensor.cpu()

    def stop_if_not_finite(self, ids: Tensor, values: dict[str, Tensor]) -> None:
        """Stop the run when a value of a real row is NaN or infinite (SageError naming the value, the target
        and its iteration), before anything of this step is written or stepped.

        ``values``: name -> tensor whose first dimension follows ``ids`` (``-1`` rows are padding).
        Collective: every rank calls it once per step, and every rank raises the same error.
        """
        problem = ""
        real = (ids >= 0).cpu()
        for name, value in values.items():
            bad = ~torch.isfinite(value.detach().reshape(len(ids), -1)).all(1).cpu() & real
            if bad.any():
                k = int(torch.nonzero(bad)[0])
                target = int(ids[k])
                number = value.detach()[k].reshape(-1)[~torch.isfinite(value.detach()[k].reshape(-1))][0].item()
                problem = f"the {name} of target {target} is {number} at iteration {int(self.iterations[target])}"
                break
        if int(self._all_ranks_sum(torch.tensor([int(bool(problem))]))[0]):  # a tensor sum every step; the
            raise_on_every_rank(problem)  # messages are gathered only when some rank has one

    def advance(self, ids: Tensor, images: Tensor, latents: Tensor, output: EnsembleOutput) -> Tensor:
        """SAGE's per-target stopping rule; returns the mask of rows that keep being optimised.

        ``ids``: ``[B]`` target ids with ``-1`` for padding. Called once per step on every rank.
        """
        self.stop_if_not_finite(
            ids, {"latent": latents, "loss": output.per_sample_loss, "probability": output.probs.transpose(0, 1)}
        )
        real = (ids >= 0).cpu()
        rows = ids.clamp(min=0).cpu()
        iterations = self.iterations[rows]
        found = real & output.failed.cpu()
        exhausted = real & ~found & (iterations >= self.max_iterations)
        active = real & ~found & ~exhausted
        status_change = torch.zeros_like(self.status)
        status_change[rows[found]] = FOUND
        status_change[rows[exhausted]] = EXHAUSTED
        stepped = torch.zeros_like(self.iterations)
        stepped[rows[active]] = 1
        changes = self._all_ranks_sum(torch.stack([status_change, stepped]))
        self.status += changes[0]
        self.iterations += changes[1]
        self.stepped_targets = torch.nonzero(changes[1]).flatten()
        keep = real.to(images.device)
        self.step_outputs = StepOutputs(
            targets=rows[real],
            iterations=iterations[real],
            images=images.detach()[keep],
            latents=latents.detach()[keep],
            output=_slice(output, keep),
            finished=(found | exhausted)[real],
            found=found[real],
        )
        done = int((self.status != RUNNING).sum())
        self.log("targets_done", float(done), prog_bar=True, batch_size=len(ids))
        self.log("failures", float((self.status == FOUND).sum()), prog_bar=True, batch_size=len(ids))
        return active.to(images.device)

    def step_loss(self, per_sample_loss: Tensor, active: Tensor) -> Tensor:
        """The loss this rank's backward runs on: the sum of the active rows' losses. When no row is active (every
        target of the batch has just stopped), a zero that reaches the parameters without the denoising graph, so
        no backward runs through the UNet that :meth:`forward_equivalents` does not charge (a target is charged
        one backward per update, none for its last evaluation). Under DDP the rank still gives its all-reduce a
        (zero) gradient."""
        if bool(active.any()):
            return (per_sample_loss * active).sum()
        return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0

    def on_train_start(self) -> None:
        if not self.running_targets():
            self.trainer.should_stop = True

    def on_train_epoch_end(self) -> None:
        if not self.running_targets():
            self.trainer.should_stop = True

    # ------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["sage_state"] = {
            "search": type(self).__name__,
            "status": self.status.clone(),
            "iterations": self.iterations.clone(),
            "targets": [t.to_dict() for t in self.targets],
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("sage_state")
        if state is None:
            raise SageError("the checkpoint holds no SAGE search state: resume from a checkpoint of a sage run")
        resume = "resume with the run's config.yaml (sage fit --config RUN/config.yaml --ckpt_path last)"
        made_by = state.get("search", type(self).__name__)  # checkpoints before 0.1.1 do not name their search
        if made_by != type(self).__name__:
            raise SageError(f"the checkpoint was made by {made_by}, this config runs {type(self).__name__}: {resume}")
        given = [t.to_dict() for t in self.targets]
        if state["targets"] and "class_index" not in state["targets"][0]:  # checkpoints before class indices
            given = [{k: v for k, v in t.items() if k != "class_index"} for t in given]
        if state["targets"] != given:
            raise SageError(f"the checkpoint was made for other targets than this config gives: {resume}")
        saved = {k: tuple(v.shape) for k, v in checkpoint.get("state_dict", {}).items()}
        mine = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        if saved != mine:
            raise SageError(
                f"the checkpoint holds parameters {saved}, this config's {type(self).__name__} has {mine}: it was "
                f"made by another search or model; {resume}"
            )
        self.status.copy_(state["status"])
        self.iterations.copy_(state["iterations"])


def _slice(output: EnsembleOutput, keep: Tensor) -> EnsembleOutput:
    return EnsembleOutput(
        loss=output.loss.detach(),
        per_sample_loss=output.per_sample_loss.detach()[keep],
        probs=output.probs.detach()[:, keep],
        topk=output.topk[:, keep],
        failed=output.failed[keep],
    )
