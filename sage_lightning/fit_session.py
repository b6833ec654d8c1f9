"""What one ``sage fit`` command holds while it runs, on an object the command owns (no module-level state):
Lightning's log lines held back until the run starts, the folders the run creates (removed when it fails to
start) and the DDP ranks it launches (awaited before the command returns)."""

from __future__ import annotations

import logging
import subprocess
import threading
from dataclasses import dataclass, field

from sage_lightning.run_folder import NewFolders

LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


class HeldLogs(logging.Handler):
    """Lightning's info lines (seed set, GPU available, tips, DDP start) held back until the run starts, then
    printed as they came: a run that fails to start on a user mistake prints only its one ``sage: error:`` line."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.saved: dict[str, tuple[list[logging.Handler], bool]] = {}

    def hold(self) -> HeldLogs:
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


@dataclass
class FitSession:
    """One ``sage fit``: its held log lines, the folders it watches and the trainer (whose launcher holds the
    ranks it started)."""

    logs: HeldLogs = field(default_factory=HeldLogs)
    folders: NewFolders = field(default_factory=NewFolders)
    trainer: object | None = None

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
