"""Helpers shared by the end-to-end search tests: run the ``sage`` CLI, kill a run, read a run folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
SAGE = [sys.executable, "-m", "sage_lightning.cli"]


def sage(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``sage ARGS`` in a fresh process; on failure show the end of its stderr."""
    proc = subprocess.run([*SAGE, *args], capture_output=True, text=True, env=ENV, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


def kill_after_first_checkpoint(run: Path, *args: str, timeout: float = 240) -> None:
    """Start ``sage fit ARGS`` into ``run``, SIGKILL it once ``checkpoints/last.ckpt`` exists (mid-run)."""
    proc = subprocess.Popen([*SAGE, *args], env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + timeout
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into the next iteration pass
    assert proc.poll() is None, "the run ended before it could be killed: make the config longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def results(run: Path) -> list[dict]:
    """The run's ``results.jsonl`` lines, sorted by target id."""
    return sorted(
        (json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()), key=lambda r: r["target"]
    )
