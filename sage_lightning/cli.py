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

import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from jsonargparse import ArgumentError
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger

from callbacks.defaults import missing_run_callbacks
from sage_lightning.analysis.cli import command as analysis_command
from sage_lightning.errors import SageError, one_line, shorten
from sage_lightning.searches import TargetSearch

DEFAULT_RUN_DIR = "runs/latent_search"
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "latent_search.yaml"
SUBCOMMANDS = ("validate", "test", "predict")
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")  # Lightning's own calls; not the user's business


LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


class _HeldLogs(logging.Handler):
    """Lightning's info lines (seed set, GPU available, tips, DDP start) held back until the run starts, then
    printed as they came: a run that fails to start on a user mistake prints only its one ``sage: error:`` line."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.saved: dict[str, tuple[list[logging.Handler], bool]] = {}

    def hold(self) -> _HeldLogs:
        if not self.saved:
            for name in LIGHTNING_LOGGERS:
                logger = logging.getLogger(name)
                self.saved[name] = (logger.handlers[:], logger.propagate)
                logger.handlers, logger.propagate = [self], False
        return self

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def let_go(self, replay: bool = True) -> None:
        """Give the loggers back their handlers; ``replay``: print what was held (else drop it)."""
        for name, (handlers, propagate) in self.saved.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = handlers, propagate
        self.saved = {}
        records, self.records = self.records, []
        for record in records if replay else []:
            logging.getLogger(record.name).handle(record)


_held_logs = _HeldLogs()


class RunConfigSaver(SaveConfigCallback):
    """Saves ``config.yaml`` at the top of the run folder once the run starts (after the checks at set-up and
    the checkpoint's), so a failed start leaves no config behind; a resumed run keeps the original."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Nothing is written before the run starts."""

    def on_fit_start(self, trainer, pl_module) -> None:
        _held_logs.let_go()  # the run starts: Lightning's lines held so far are printed now
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


RUN_MARKERS = ("checkpoints", "results.jsonl", "logs")
# What decides a run's results: a restart that keeps a run's result lines must have the same values here.
RESULT_KEYS = ("seed_everything", "model", "data", "optimizer", "lr_scheduler", "trainer.callbacks")


def _flat(value, key: str) -> dict[str, object]:
    """``{dotted key: leaf value}`` of a config part (lists are leaves)."""
    if isinstance(value, dict) and value:
        return {k: v for name, item in value.items() for k, v in _flat(item, f"{key}.{name}").items()}
    return {key: value}


def _part(config: dict, key: str):
    for name in key.split("."):
        config = config.get(name) if isinstance(config, dict) else None
    return config


def config_difference(saved: dict, new: dict) -> tuple[str, object, object] | None:
    """The first key of :data:`RESULT_KEYS` (dotted, to the leaf) whose value differs, with both values."""
    for key in RESULT_KEYS:
        before, after = _flat(_part(saved, key), key), _flat(_part(new, key), key)
        for leaf in [*after, *(k for k in before if k not in after)]:
            if before.get(leaf) != after.get(leaf):
                return leaf, before.get(leaf), after.get(leaf)
    return None


def _brief(value, longest: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= longest else f"{text[: longest - 3]}..."


def _check_same_config(root: Path, parser, cfg) -> None:
    """A restart that keeps ``root``'s result lines must run the config that wrote them (its config.yaml)."""
    saved_path = root / "config.yaml"
    if not saved_path.is_file():
        raise SageError(
            f"run folder {str(root)!r} holds results.jsonl but no config.yaml, so the config that wrote them is "
            "unknown: choose a new folder with --trainer.default_root_dir"
        )
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise SageError(f"{str(saved_path)!r} is unreadable ({type(err).__name__}): choose a new folder") from err
    differ = config_difference(saved, yaml.safe_load(parser.dump(cfg, skip_none=False)) or {})
    if differ is not None:
        key, before, after = differ
        raise SageError(
            f"run folder {str(root)!r} holds results of another config ({key}: {_brief(before)} there, "
            f"{_brief(after)} now): "
            f"finish that run with its own config, sage fit --config {saved_path} --ckpt_path last, or start this "
            "one in a new folder (--trainer.default_root_dir)"
        )


@dataclass
class _Trace:
    """What this process's ``sage fit`` created: folders to remove when the run fails to start, ranks to await."""

    root: Path | None = None
    existing: set[Path] = field(default_factory=set)
    trainer: Trainer | None = None

    def watch(self, root: Path) -> None:
        self.root = root.absolute()
        top = next((p for p in (self.root, *self.root.parents) if p.exists()), None)
        inside = {p for p in top.rglob("*") if p.is_dir()} if top == self.root else set()
        self.existing = {top, *top.parents, *inside}

    def remove_new_empty_folders(self) -> None:
        """Undo the empty folders (logs/version_N, the run folder) made by a run that failed to start."""
        if self.root is None:
            return
        candidates = [p for p in self.root.rglob("*") if p.is_dir()] if self.root.is_dir() else []
        candidates += [self.root, *self.root.parents]
        for folder in sorted(candidates, key=lambda p: len(p.parts), reverse=True):
            try:
                if folder not in self.existing and folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
            except OSError:  # removed or filled meanwhile: leave it
                continue

    def await_ranks(self, timeout: float = 60) -> None:
        """Return only after the other DDP ranks this process launched have exited (killed after ``timeout``)."""
        launcher = getattr(getattr(self.trainer, "strategy", None), "launcher", None)
        procs = list(getattr(launcher, "procs", None) or [])
        for thread in threading.enumerate():  # Lightning's observer SIGKILLs this process when a rank exits != 0
            if hasattr(thread, "_child_processes"):
                thread._child_processes = []
        for proc in procs:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


_trace = _Trace()


def _check_run_folder(root: Path) -> None:
    """Refuse a run folder that cannot be created or written (before anything is built or written)."""
    for folder in (root.absolute(), *root.absolute().parents):
        if not folder.exists():
            continue
        if not folder.is_dir():
            raise SageError(
                f"run folder {str(root)!r} cannot be created: {str(folder)!r} is a file; choose another "
                "--trainer.default_root_dir"
            )
        if not os.access(folder, os.W_OK | os.X_OK):
            raise SageError(f"run folder {str(root)!r} cannot be written: {str(folder)!r} is not writable")
        return


def _copied_run_folder(config_files: list, root: Path) -> Path | None:
    """The folder of a run's ``config.yaml`` given with ``--config`` when that run was copied or moved there
    (its stored run folder is elsewhere and the command names no other one): the copy resumes itself."""
    for given in config_files:
        path = Path(getattr(given, "absolute", None) or str(given))
        if path.name != "config.yaml" or not any((path.parent / m).exists() for m in RUN_MARKERS):
            continue
        try:
            stored = (yaml.safe_load(path.read_text()) or {}).get("trainer", {}).get("default_root_dir")
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if stored and Path(stored).absolute() == root.absolute() and root.resolve() != path.parent.resolve():
            return path.parent
    return None


class SageCLI(LightningCLI):
    """LightningCLI with SAGE's defaults: the latent search on ShapesWorld, a run folder, checkpoints."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_callback", RunConfigSaver)
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
        callbacks.extend(missing_run_callbacks(root, list(config.get("callbacks") or []) + list(callbacks),
                                               progress_bar=config.get("enable_progress_bar") is not False))
        callbacks.append(InterruptedRunReport())
        _trace.trainer = super()._instantiate_trainer(config, callbacks)
        return _trace.trainer

    def _parse_ckpt_path(self) -> None:
        """Check the run folder and the checkpoint before anything is built (LightningCLI reads it next)."""
        sub = self.config.get("subcommand")
        if sub == "fit":
            cfg = self.config[sub]
            root = Path(cfg.trainer.default_root_dir or DEFAULT_RUN_DIR)
            copy = _copied_run_folder(cfg.get("config") or [], root)
            if copy is not None:
                root = copy
                cfg.trainer.default_root_dir = str(copy)
            _check_run_folder(root)
            _trace.watch(root)
            ckpt = cfg.get("ckpt_path")
            if ckpt is None and (root / "results.jsonl").exists():
                raise SageError(
                    f"run folder {str(root)!r} already holds results.jsonl: resume it with --ckpt_path last, or "
                    "choose a new folder with --trainer.default_root_dir"
                )
            if ckpt == "last":
                ckpt = str(root / "checkpoints" / "last.ckpt")
                if not Path(ckpt).is_file():  # killed before its first checkpoint: the run starts again and
                    if (root / "results.jsonl").exists():  # redoes exactly what it did (the same config: checked);
                        _check_same_config(root, self._parser(sub), cfg)
                    ckpt = None  # result lines already written are not repeated
                    print(f"sage: {str(root)!r} holds no checkpoint yet: the run starts from the beginning",
                          file=sys.stderr)
            if ckpt is not None:
                _check_checkpoint(Path(ckpt))
                cfg["ckpt_path"] = ckpt
        super()._parse_ckpt_path()

    def after_fit(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # avoids a rare abort at interpreter exit (STACK_NOTES)
        _trace.await_ranks()  # the command returns only after every rank has exited
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


def write_run_report(root: Path) -> None:
    """``root/report.html`` at the end of ``sage fit`` (rank 0). A report that cannot be written never fails the
    run: one line says why and how to write it later."""
    if not (root / "results.jsonl").is_file():
        return
    from sage_lightning.report import write_report

    try:
        path = write_report(root)
    except Exception as err:  # the search's results are safe on disk; the page is a view of them
        print(f"sage: report not written ({type(err).__name__}: {' '.join(str(err).split())[:200]}); write it "
              f"with: sage report {root}", file=sys.stderr)
        return
    print(f"Report: {path.resolve()}")


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
    global _trace
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] == "analyze":  # the paper's analyses of a run folder (sage_lightning/analysis/cli.py)
        return analysis_command(list(argv[1:]))
    if argv and argv[0] == "report":  # the run's HTML report (sage_lightning/report/)
        from sage_lightning.report import main as report_command

        return report_command(list(argv[1:]))
    _trace = _Trace()
    _held_logs.hold()  # until the run starts (RunConfigSaver.on_fit_start)
    try:
        SageCLI(args=args)
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None and isinstance(err, ArgumentError):
            user_error = SageError(f"{one_line(str(err))} (sage fit --help lists the options)")
        if user_error is None:
            _held_logs.let_go()  # a crash keeps its context
            _trace.await_ranks()
            raise
        _held_logs.let_go(replay=False)  # a user mistake: its one line alone
        if _launched_rank():  # rank 0 reports and cleans up for all
            sys.exit(2)
        print(f"sage: error: {shorten(' '.join(str(user_error).split()))}", file=sys.stderr)
        _trace.await_ranks()
        _trace.remove_new_empty_folders()
        sys.exit(2)
    finally:
        _held_logs.let_go()


if __name__ == "__main__":
    main()
