"""One training run of a stage: resume > warm start > seed, Lightning's loop, exports on a clock.

Each run
- resumes from ``shapesworld_work/<stage>/last.ckpt`` when it exists (model, optimizer, step);
- otherwise warm-starts from the shipped weights when they exist (weights only), else starts from seed;
- trains ``max_steps`` more steps on freshly generated data (batch k of a run uses seed f(stage, step));
- exports the current weights to the shipped folder every ``export_minutes`` and at the end, with
  its gate figure, into ``weights/world.json`` (cumulative step counts across runs and sessions).
"""

from __future__ import annotations

import inspect
import logging
import sys
import time
from dataclasses import dataclass, field

import lightning as L
import torch
from torch.utils.data import DataLoader

from sage_lightning.errors import SageError
from sage_lightning.shapesworld import world as W
from sage_lightning.shapesworld.training.base import STAGE_SEEDS, STAGES, Steps, WorldModule, log
from sage_lightning.shapesworld.training.clip import ClipModule
from sage_lightning.shapesworld.training.text import TextModule
from sage_lightning.shapesworld.training.unet import UnetModule
from sage_lightning.shapesworld.training.vae import VaeModule

MODULES: dict[str, type[WorldModule]] = {"text": TextModule, "clip": ClipModule, "vae": VaeModule,
                                         "unet": UnetModule}
SHIPPED = {"text": W.CLIP_DIR / "model.safetensors",
           "clip": W.CLIP_DIR / "model.safetensors", "vae": W.PIPELINE_DIR / "vae" / "config.json",
           "unet": W.PIPELINE_DIR / "unet" / "config.json"}


@dataclass
class RunOptions:
    """How a run trains, besides its stage and step count.

    Attributes:
        threads: torch CPU threads.
        export_minutes: export interval.
        batch_size, lr: the module's, when given.
        fresh: ignore checkpoints and shipped weights (start from seed).
        freeze_text: clip: train the vision side only.
        check_draws: unet: judged samples at each export.
        overrides: ``KEY=VALUE`` module settings, also on resume.
        accelerator: Lightning accelerator.
        anneal: cosine-anneal the learning rate from ``lr`` to ``anneal * lr`` over this run's steps (the
            schedule belongs to this run only: a later resume without it trains at ``lr`` again).
    """

    threads: int = 1
    export_minutes: float = 12.0
    batch_size: int | None = None
    lr: float | None = None
    fresh: bool = False
    freeze_text: bool = False
    check_draws: int | None = None
    overrides: list[str] = field(default_factory=list)
    accelerator: str = "cpu"
    anneal: float | None = None


class Exporter(L.Callback):
    """Export to the shipped folder every ``minutes`` of training and at the end of the run."""

    def __init__(self, minutes: float):
        self.every = minutes * 60
        self.last = time.time()

    def _export(self, module: WorldModule) -> None:
        figures = module.export()
        if figures:
            W.update_world(module.stage, **figures)
        self.last = time.time()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        """Export when ``minutes`` have passed since the last export."""
        if time.time() - self.last >= self.every:
            self._export(module)

    def on_train_end(self, trainer, module):
        """Export at the end of the run."""
        self._export(module)


def _unet_matches_text_tower() -> bool:
    trained_on = W.read_world().get("stages", {}).get("unet", {}).get("text_tower_sha256")
    return trained_on == W.state_sha256(W.text_tower(W.load_clip()))


def setup_logging(stage: str) -> None:
    """Log the run to ``<work>/<stage>/train.log`` and to stdout."""
    folder = W.WORK / stage
    folder.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for h in (logging.FileHandler(folder / "train.log"), logging.StreamHandler(sys.stdout)):
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(logging.INFO)


def _module_settings(stage: str, options: RunOptions) -> dict:
    """The module's keyword arguments the options set (``--set`` values cast to the setting's type)."""
    kwargs = {k: v for k, v in {"batch_size": options.batch_size, "lr": options.lr}.items() if v is not None}
    if options.freeze_text:
        kwargs["freeze_text"] = True
    if options.check_draws is not None:
        kwargs["check_draws"] = options.check_draws
    params = inspect.signature(MODULES[stage].__init__).parameters
    for item in options.overrides:
        key, value = item.split("=", 1)
        if key not in params:
            raise SageError(f"--set {key}: {stage} has no such setting ({', '.join(list(params)[1:])})")
        default = params[key].default
        kwargs[key] = value.lower() in ("1", "true", "yes") if isinstance(default, bool) else type(default)(value)
    return kwargs


def train(stage: str, max_steps: int, options: RunOptions | None = None) -> dict:
    """Train ``stage`` for ``max_steps`` more steps (resume > warm start > seed); returns world.json."""
    options = options or RunOptions()
    anneal = options.anneal
    if anneal is not None and not 0 < anneal <= 1:
        raise SageError(f"--anneal {anneal}: give the final learning rate as a fraction of lr in (0, 1], e.g. 0.1")
    if stage not in MODULES:
        raise SageError(f"unknown stage {stage!r}: use one of {', '.join(STAGES)}")
    torch.set_num_threads(options.threads)
    setup_logging(stage)
    folder = W.WORK / stage
    ckpt = folder / "last.ckpt"
    kwargs = _module_settings(stage, options)
    cls = MODULES[stage]
    resume = ckpt.exists() and not options.fresh
    if resume:
        module = cls.load_from_checkpoint(ckpt, **kwargs) if kwargs else cls.load_from_checkpoint(ckpt)
        done = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
        how = f"resuming {ckpt} at run step {done} (total {module.hparams.base_steps + done})"
    else:
        warm = SHIPPED[stage].exists() and not options.fresh
        if warm and stage == "unet" and not _unet_matches_text_tower():
            warm = False
            log.info("unet: the shipped UNet was trained on another text tower than the shipped one: from seed")
        base = W.read_world().get("stages", {}).get(stage, {}).get("steps", 0) if warm else 0
        module = cls(base_steps=base, warm=warm, **kwargs)
        done = 0
        how = f"warm start from shipped weights (total steps {base})" if warm else "fresh start from seed 0"
    if anneal is not None:
        module.anneal = (done, max_steps, anneal)
        how += f"; lr cosine-annealed to {anneal} x lr over these steps"
    log.info(f"{stage}: {how}; training {max_steps} more steps with {options.threads} thread(s)")
    L.seed_everything(STAGE_SEEDS[stage] * 1000 + done, workers=True, verbose=False)
    trainer = L.Trainer(
        max_steps=done + max_steps, accelerator=options.accelerator, devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(folder), num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        callbacks=[
            L.pytorch.callbacks.ModelCheckpoint(dirpath=str(folder), filename="{step}", save_last=True,
                                                save_top_k=1, every_n_train_steps=100),
            Exporter(options.export_minutes),
        ],
    )
    loader = DataLoader(Steps(), batch_size=1, num_workers=0)
    trainer.fit(module, loader, ckpt_path=str(ckpt) if resume else None)
    return W.read_world()
