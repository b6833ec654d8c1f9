"""The ``sage`` command: LightningCLI over the SAGE searches (``sage fit --config configs/X.yaml``).

The run folder is ``--trainer.default_root_dir`` (default ``runs/latent_search``). It holds
``config.yaml``, ``checkpoints/last.ckpt`` (one per finished iteration pass), ``logs/`` (CSV metrics),
``results.jsonl``, ``images/``, ``latents/``, ``summary.json`` and ``gallery.png``.
Resume a killed run with ``sage fit --config RUN/config.yaml --ckpt_path last``.
User mistakes end with one line ``sage: error: ...`` and exit status 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger

from callbacks.defaults import missing_run_callbacks
from sage_lightning.errors import SageError
from sage_lightning.searches import TargetSearch

DEFAULT_RUN_DIR = "runs/latent_search"
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "latent_search.yaml"
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")  # Lightning's own calls; not the user's business


class RunConfigSaver(SaveConfigCallback):
    """Saves ``config.yaml`` at the top of the run folder; a resumed run keeps the original."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        path = Path(trainer.default_root_dir) / self.config_filename
        if trainer.is_global_zero and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(path), skip_none=False, overwrite=True, multifile=False)
        self.already_saved = True


def _check_checkpoint(path: Path) -> None:
    if not path.is_file():
        raise SageError(f"checkpoint {str(path)!r} does not exist: check --ckpt_path or start without it")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: name it, do not dump the unpickler's trace
        raise SageError(
            f"checkpoint {str(path)!r} is unreadable ({type(err).__name__}): it is corrupt or not a sage "
            "checkpoint; resume from another one or start the run afresh in a new folder"
        ) from err


class SageCLI(LightningCLI):
    """LightningCLI with SAGE's defaults: the latent search on ShapesWorld, a run folder, checkpoints."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_callback", RunConfigSaver)
        if DEFAULT_CONFIG.is_file():  # `sage fit` alone = the latent search on ShapesWorld
            kwargs.setdefault("parser_kwargs", {"fit": {"default_config_files": [str(DEFAULT_CONFIG)]}})
        kwargs.setdefault(
            "trainer_defaults",
            {
                "default_root_dir": DEFAULT_RUN_DIR,
                "max_epochs": -1,
                "num_sanity_val_steps": 0,
                "limit_val_batches": 0,
                "accelerator": "cpu",
                "devices": 1,
            },
        )
        super().__init__(TargetSearch, None, *args, subclass_mode_model=True, subclass_mode_data=True, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults(
            {
                "model": {"class_path": "sage_lightning.searches.LatentSearch"},
                "data": {"class_path": "datamodules.ClassPromptDataModule"},
            }
        )

    def _instantiate_trainer(self, config: dict, callbacks: list) -> object:
        root = Path(config.get("default_root_dir") or DEFAULT_RUN_DIR)
        if config.get("max_epochs") in (None, -1) and isinstance(self.model, TargetSearch):
            config["max_epochs"] = self.model.max_iterations + 1  # one epoch = one iteration per target
        config["default_root_dir"] = str(root)
        if config.get("logger") in (None, True):
            config["logger"] = CSVLogger(str(root), name="logs")
        callbacks.extend(missing_run_callbacks(root, list(config.get("callbacks") or []) + list(callbacks)))
        return super()._instantiate_trainer(config, callbacks)

    def _parse_ckpt_path(self) -> None:
        """Check the run folder and the checkpoint before anything is built (LightningCLI reads it next)."""
        sub = self.config.get("subcommand")
        if sub == "fit":
            cfg = self.config[sub]
            root = Path(cfg.trainer.default_root_dir or DEFAULT_RUN_DIR)
            ckpt = cfg.get("ckpt_path")
            if ckpt is None and (root / "results.jsonl").exists():
                raise SageError(
                    f"run folder {str(root)!r} already holds results.jsonl: resume it with --ckpt_path last, or "
                    "choose a new folder with --trainer.default_root_dir"
                )
            if ckpt == "last":
                ckpt = str(root / "checkpoints" / "last.ckpt")
                if not Path(ckpt).is_file():
                    raise SageError(
                        f"no checkpoint to resume in {str(root)!r} (no checkpoints/last.ckpt): drop --ckpt_path"
                    )
            if ckpt is not None:
                _check_checkpoint(Path(ckpt))
                cfg["ckpt_path"] = ckpt
        super()._parse_ckpt_path()

    def after_fit(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # avoids a rare abort at interpreter exit (STACK_NOTES)


def _user_error(err: BaseException) -> SageError | None:
    """The SageError behind ``err`` (jsonargparse wraps errors raised while it instantiates classes)."""
    while err is not None:
        if isinstance(err, SageError):
            return err
        err = err.__cause__ or err.__context__
    return None


def main(args: list[str] | None = None) -> None:
    try:
        SageCLI(args=args)
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None:
            raise
        print(f"sage: error: {user_error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
