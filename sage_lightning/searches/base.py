"""What every SAGE search over (class, prompt, seed) targets shares: frozen models and target states.

A target is *running* until the discriminator D declares a failure (*found*) or its iteration budget is
spent (*exhausted*). One epoch = one iteration for every running target; the datamodule asks
``running_targets()`` at each epoch start, so finished targets cost nothing more. Under DDP each rank
attacks its own targets and the state changes are summed across ranks after every step, so all ranks
agree on every target's state; the adversarial parameters are replicated and their gradients averaged
by DDP, which leaves the sign (the only thing a sign-gradient step uses) unchanged.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor

from sage_lightning.cost import UNET_EVALUATIONS, SamplingCost
from sage_lightning.errors import SageError
from sage_lightning.flow_sampler import encoder_for, latent_shape_of, sampler_for, search_cost
from sage_lightning.models import DiffusionModel, check_source, default_ensemble, load_diffusion, load_scheduler
from sage_lightning.optim import SignSGD, check_lr
from sage_lightning.sampler import DiffusionSampler, GradientMode, ResidualGradient, loop_length
from sage_lightning.searches.collective import DIVERGED as DIVERGED
from sage_lightning.searches.collective import all_gather_objects as all_gather_objects
from sage_lightning.searches.collective import raise_on_every_rank
from sage_lightning.searches.outputs import StepOutputs, slice_output
from sage_lightning.searches.settings import CPU_WORLD_ITERATIONS as CPU_WORLD_ITERATIONS
from sage_lightning.searches.settings import EMBEDDING_BOX as EMBEDDING_BOX
from sage_lightning.searches.settings import LATENT_BOX as LATENT_BOX
from sage_lightning.searches.settings import MICRO_CONDITIONING as MICRO_CONDITIONING
from sage_lightning.searches.settings import PAPER_ITERATIONS as PAPER_ITERATIONS
from sage_lightning.searches.settings import (
    check_guidance,
    check_micro_conditioning,
    default_max_iterations,
    import_class,
    target_class_indices,
    with_micro_conditioning,
)
from sage_lightning.searches.settings import clamp_constraint as clamp_constraint
from sage_lightning.surrogate import ClassifierEnsemble, EnsembleOutput
from sage_lightning.surrogate.views import check_views
from sage_lightning.targets import Target, noise_generator
from sage_lightning.text import PromptEncoder, XLConditioning, XLPromptEncoder

RUNNING, FOUND, EXHAUSTED = 0, 1, 2


class _Frozen:
    """Holds the frozen models outside the module tree: never checkpointed, moved, trained or DDP-synced."""

    def __init__(self, model: DiffusionModel, ensemble: ClassifierEnsemble, encoder: PromptEncoder | XLPromptEncoder):
        self.model, self.ensemble, self.encoder = model, ensemble, encoder

    def to(self, device: torch.device) -> None:
        self.model.to(device)
        self.ensemble.to(device)


class TargetSearch(L.LightningModule):
    """Base of the searches. Subclasses define the adversarial parameters and ``training_step``.

    A search names its result writer (``result_writer``), the callbacks its method needs
    (:meth:`method_callbacks`) and its constraints (:meth:`constraints`: the clamp box, the Gaussian shell) by
    class path; :meth:`configure_callbacks` adds those a run lacks, so the CLI and a plain ``Trainer`` get the same
    run folder and the same constrained search.

    Args:
        diffusion: model source for :func:`sage_lightning.models.load_diffusion` (``shapesworld``,
            ``tiny``, a folder or a hub id).
        ensemble: the discriminator D; None takes the source's default ensemble.
        views: D's nuisance views (ours, :class:`~sage_lightning.surrogate.ClassifierEnsemble`); None: D's own.
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
        true_cfg_scale: FLUX's true classifier-free guidance (> 1: a second transformer call a step on the empty
            prompt, as ``FluxPipeline(true_cfg_scale=..., negative_prompt="")``); other models refuse it.
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
        true_cfg_scale: float = 1.0,
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
        check_guidance(guidance_scale, true_cfg_scale)
        self.diffusion_source, self.scheduler_name, self.dtype_name = diffusion, scheduler, dtype
        self.local_files_only = local_files_only
        self.num_steps, self.guidance_scale, self.lr = num_steps, guidance_scale, lr
        self.true_cfg_scale = true_cfg_scale
        self.max_iterations = max_iterations
        self.grad_mode = grad_mode or ResidualGradient()
        # A plain attribute, not a submodule: a config-given D is never checkpointed, moved or DDP-synced.
        self.__dict__["_ensemble_arg"] = ensemble
        self._frozen: _Frozen | None = None
        self.targets: list[Target] = []
        self.step_outputs: StepOutputs | None = None
        self.stepped_targets = torch.zeros(0, dtype=torch.long)

    result_writer = "sage_lightning.callbacks.failure_writer.FailureWriter"

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
    def ensemble(self) -> ClassifierEnsemble:
        """The discriminator D: the config's, else the source's default ensemble (built once, on first use, without
        loading the diffusion model; :meth:`prepare` uses this same one)."""
        if self._frozen is not None:
            return self._frozen.ensemble
        if self._ensemble_arg is None:
            self.__dict__["_ensemble_arg"] = default_ensemble(self.diffusion_source)
        self._ensemble_arg.views = self.views or self._ensemble_arg.views
        return self._ensemble_arg

    def latent_shape(self) -> tuple[int, int, int]:
        """The shape ``[C, h, w]`` of one initial latent (the UNet's input; SD3 / FLUX: unpacked, issue 23)."""
        return latent_shape_of(self.frozen.model)

    def adversarial_rows(self) -> Tensor:
        """The parameter whose rows (one per target) the constraint callbacks act on; a search without one says so."""
        raise SageError(f"{type(self).__name__} has no adversarial parameters: drop ClampPerturbation and "
                        "LatentProjection from its callbacks")

    @property
    def sampler(self) -> DiffusionSampler:
        return sampler_for(self.frozen.model, self.num_steps, self.guidance_scale, self.grad_mode, self.eta,
                           self.true_cfg_scale)

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
        ensemble = self.ensemble
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
        self._frozen = _Frozen(model, ensemble, encoder_for(model))
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

    @property
    def cost(self) -> SamplingCost:
        """The cost model of the sampling settings (:func:`~sage_lightning.flow_sampler.search_cost`); no weights."""
        return search_cost(self.diffusion_source, self.loop_length, self.guidance_scale, self.grad_mode,
                           self.local_files_only, self.true_cfg_scale)

    def unet_evaluations(self, iterations: int) -> int:
        """UNet evaluations a target used after ``iterations`` updates (:meth:`SamplingCost.gradient_search`)."""
        return self.cost.gradient_search(iterations, UNET_EVALUATIONS)

    def forward_equivalents(self, iterations: int) -> int:
        """Compute a target used after ``iterations`` updates, in forward-equivalents
        (:meth:`SamplingCost.gradient_search`)."""
        return self.cost.gradient_search(iterations)

    def forward_equivalents_spent(self) -> int:
        """Forward-equivalents spent so far over all targets (what the progress bar shows per second)."""
        values, counts = torch.unique(self.iterations, return_counts=True)  # one cost per distinct count
        return sum(int(n) * self.forward_equivalents(int(i)) for i, n in zip(values, counts, strict=True))

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
        self.status += self._all_ranks_sum(status_change)
        self.count_steps(rows[active])
        keep = real.to(images.device)
        self.step_outputs = StepOutputs(
            targets=rows[real],
            iterations=iterations[real],
            images=images.detach()[keep],
            latents=latents.detach()[keep],
            output=slice_output(output, keep),
            finished=(found | exhausted)[real],
            found=found[real],
        )
        done = int((self.status != RUNNING).sum())
        self.log("targets_done", float(done), prog_bar=True, batch_size=len(ids))
        self.log("failures", float((self.status == FOUND).sum()), prog_bar=True, batch_size=len(ids))
        return active.to(images.device)

    def count_steps(self, rows: Tensor) -> None:
        """One more iteration for each target of ``rows`` (this rank's), summed over ranks so that every rank
        agrees; ``stepped_targets``: the targets stepped on any rank (the rows the constraints act on)."""
        stepped = torch.zeros_like(self.iterations)
        stepped[rows.cpu()] = 1
        stepped = self._all_ranks_sum(stepped)
        self.iterations += stepped
        self.stepped_targets = torch.nonzero(stepped).flatten()

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
