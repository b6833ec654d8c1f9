"""The ``sage`` command: LightningCLI over the SAGE searches (``sage fit --config configs/X.yaml``).

The run folder is ``--trainer.default_root_dir`` (default ``runs/latent_search``). It holds
``config.yaml``, ``checkpoints/last.ckpt`` (one per finished iteration pass), ``logs/`` (CSV metrics),
``results.jsonl``, ``images/``, ``latents/``, ``summary.json``, ``gallery.png`` and ``report.html``
(``sage report RUN_DIR`` writes it again, for a killed run too).
Resume a killed run with ``sage fit --config RUN/config.yaml --ckpt_path last`` (killed at any moment: before
its first checkpoint the run starts again; a copied run folder resumes itself). User mistakes, parse errors
included, end with one line ``sage: error: ...`` and exit status 2, and a run that fails to start leaves
nothing in its folder. Under DDP the command returns after every rank has exited.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import torch.distributed as dist
import yaml
from jsonargparse import ArgumentError
from lightning.pytorch import Callback
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger

from sage_lightning.analysis.cli import command as analysis_command
from sage_lightning.callbacks.defaults import missing_run_callbacks
from sage_lightning.errors import SageError, one_line, shorten
from sage_lightning.fit_session import FitSession, HeldLogs
from sage_lightning.run_folder import check_run_folder, copied_run_folder, fit_checkpoint, write_run_report
from sage_lightning.searches import TargetSearch
from sage_lightning.shipped_configs import configs_folder, with_shipped_configs

DEFAULT_RUN_DIR = "runs/latent_search"
DEFAULT_CONFIG = configs_folder() / "latent_search.yaml"
SUBCOMMANDS = ("validate", "test", "predict")
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")  # Lightning's own calls; not the user's business


class RunConfigSaver(SaveConfigCallback):
    """Saves ``config.yaml`` at the top of the run folder once the run starts (after the checks at set-up and
    the checkpoint's), so a failed start leaves no config behind; a resumed run keeps the original.
    ``logs``: the command's held Lightning lines, printed when the run starts."""

    def __init__(self, *args, logs: HeldLogs | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.logs = logs

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Nothing is written before the run starts."""

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.logs is not None:
            self.logs.let_go()  # the run starts: Lightning's lines held so far are printed now
        if self.already_saved:
            return
        path = Path(trainer.default_root_dir) / self.config_filename
        # A run that starts afresh (no checkpoint, no results kept) writes its own config over one a failed
        # earlier start left behind; a resumed run keeps the config that wrote its results.
        fresh = trainer.ckpt_path is None and not (path.parent / "results.jsonl").exists()
        if trainer.is_global_zero and (fresh or not path.exists()):
            path.parent.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(path), skip_none=False, overwrite=True, multifile=False)
        self.already_saved = True


class SageCLI(LightningCLI):
    """LightningCLI with SAGE's defaults: the latent search on ShapesWorld, a run folder, checkpoints.
    ``session``: what the command holds while it runs (a fresh one when not given)."""

    def __init__(self, *args, session: FitSession | None = None, **kwargs) -> None:
        self.session = session or FitSession()
        kwargs.setdefault("save_config_callback", RunConfigSaver)
        kwargs.setdefault("save_config_kwargs", {"logs": self.session.logs})
        fit_kwargs = {"exit_on_error": False}  # parse errors reach main(), which prints them as one line
        if DEFAULT_CONFIG.is_file():  # `sage fit` alone = the latent search on ShapesWorld
            fit_kwargs["default_config_files"] = [str(DEFAULT_CONFIG)]
        kwargs.setdefault(
            "parser_kwargs",
            {"exit_on_error": False, "fit": fit_kwargs, **{s: {"exit_on_error": False} for s in SUBCOMMANDS}},
        )
        kwargs.setdefault(
            "trainer_defaults",
            {
                "default_root_dir": DEFAULT_RUN_DIR,
                "max_epochs": -1,
                "num_sanity_val_steps": 0,
                "limit_val_batches": 0,
                "accelerator": "cpu",
                "devices": 1,
                "log_every_n_steps": 1,  # every step's loss in logs/ (the report plots loss per iteration)
            },
        )
        super().__init__(TargetSearch, None, *args, subclass_mode_model=True, subclass_mode_data=True, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults(
            {
                "model": {"class_path": "sage_lightning.searches.LatentSearch"},
                "data": {"class_path": "sage_lightning.datamodules.ClassPromptDataModule"},
            }
        )

    def _instantiate_trainer(self, config: dict, callbacks: list) -> object:
        root = Path(config.get("default_root_dir") or DEFAULT_RUN_DIR)
        if config.get("max_epochs") in (None, -1) and isinstance(self.model, TargetSearch):
            config["max_epochs"] = self.model.max_iterations + 1  # one epoch = one iteration per target
        config["default_root_dir"] = str(root)
        if config.get("logger") in (None, True):
            config["logger"] = CSVLogger(str(root), name="logs")
        callbacks.extend(missing_run_callbacks(root, list(config.get("callbacks") or []) + list(callbacks),
                                               progress_bar=config.get("enable_progress_bar") is not False))
        callbacks.append(InterruptedRunReport())
        self.session.trainer = super()._instantiate_trainer(config, callbacks)
        return self.session.trainer

    def _parse_ckpt_path(self) -> None:
        """Check the run folder and the checkpoint before anything is built (LightningCLI reads it next)."""
        sub = self.config.get("subcommand")
        if sub == "fit":
            cfg = self.config[sub]
            root = Path(cfg.trainer.default_root_dir or DEFAULT_RUN_DIR)
            copy = copied_run_folder(cfg.get("config") or [], root)
            if copy is not None:
                root = copy
                cfg.trainer.default_root_dir = str(copy)
            check_run_folder(root)
            self.session.folders.watch(root)
            ckpt = fit_checkpoint(root, cfg.get("ckpt_path"),
                                  lambda: yaml.safe_load(self._parser(sub).dump(cfg, skip_none=False)) or {})
            if ckpt is not None:
                cfg["ckpt_path"] = ckpt
        super()._parse_ckpt_path()

    def after_fit(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # avoids a rare abort at interpreter exit (STACK_NOTES)
        self.session.await_ranks()  # the command returns only after every rank has exited
        if self.trainer.is_global_zero:
            write_run_report(Path(self.trainer.default_root_dir))


class InterruptedRunReport(Callback):
    """Ctrl-C during ``sage fit``: the run stops at the next step (a second Ctrl-C: at once), Lightning shuts it
    down (its last per-pass checkpoint stays), and rank 0 writes the report of what was found so far and says
    how to resume. Python's own SIGINT handler raises wherever the signal lands, and a KeyboardInterrupt raised
    inside a ``__del__`` is swallowed: the run then went on as if nothing was pressed."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        if self.requested:  # the second Ctrl-C: Python's behaviour
            raise KeyboardInterrupt
        self.requested = True
        print("sage: stopping after this step (Ctrl-C again to stop at once)", file=sys.stderr)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")  # Python's handler back, whatever stopped the run
        if not isinstance(exception, KeyboardInterrupt) or not trainer.is_global_zero:
            return
        root = Path(trainer.default_root_dir)
        print(f"sage: interrupted; resume with: sage fit --config {root / 'config.yaml'} --ckpt_path last",
              file=sys.stderr)
        write_run_report(root)


def _user_error(err: BaseException) -> SageError | None:
    """The SageError behind ``err`` (jsonargparse wraps errors raised while it instantiates classes)."""
    while err is not None:
        if isinstance(err, SageError):
            return err
        err = err.__cause__ or err.__context__
    return None


def _launched_rank() -> bool:
    """This process is a DDP rank other than the first (its errors are reported by rank 0)."""
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) != "0"


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] == "analyze":  # the paper's analyses of a run folder (sage_lightning/analysis/cli.py)
        return analysis_command(list(argv[1:]))
    if argv and argv[0] == "report":  # the run's HTML report (sage_lightning/report/)
        from sage_lightning.report import main as report_command

        return report_command(list(argv[1:]))
    session = FitSession()
    session.logs.hold()  # until the run starts (RunConfigSaver.on_fit_start)
    try:
        SageCLI(args=with_shipped_configs(args), session=session)  # `--config latent_search`: a shipped config
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None and isinstance(err, ArgumentError):
            user_error = SageError(f"{one_line(str(err))} (sage fit --help lists the options)")
        if user_error is None:
            session.logs.let_go()  # a crash keeps its context
            session.await_ranks()
            raise
        session.logs.let_go(replay=False)  # a user mistake: its one line alone
        if _launched_rank():  # rank 0 reports and cleans up for all
            sys.exit(2)
        print(f"sage: error: {shorten(' '.join(str(user_error).split()))}", file=sys.stderr)
        session.await_ranks()
        session.folders.remove_new_empty_folders()
        sys.exit(2)
    finally:
        session.logs.let_go()


if __name__ == "__main__":
    main()
