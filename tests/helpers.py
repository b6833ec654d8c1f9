"""Helpers shared by the end-to-end search tests: run the ``sage`` CLI, kill a run, read a run folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_benchmark(script: str, name: str):
    """Import ``benchmarks/<script>`` as module ``name`` (registered in ``sys.modules``: dataclasses look it up)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
SAGE = [sys.executable, "-m", "sage_lightning.cli"]


def sage(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``sage ARGS`` in a fresh process; on failure show the end of its stderr."""
    proc = subprocess.run([*SAGE, *args], capture_output=True, text=True, env=ENV, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


def kill_when(ready: Callable[[], bool], *args: str, timeout: float = 240) -> None:
    """Start ``sage ARGS``; SIGKILL it as soon as ``ready()`` holds (it must still be running then)."""
    proc = subprocess.Popen([*SAGE, *args], env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: make the config longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def kill_after_first_checkpoint(run: Path, *args: str, timeout: float = 240) -> None:
    """Start ``sage fit ARGS`` into ``run``, SIGKILL it once ``checkpoints/last.ckpt`` exists (mid-run)."""
    ckpt = run / "checkpoints" / "last.ckpt"
    seen: list[float] = []

    def ready() -> bool:  # 0.5 s after the first checkpoint: into the next iteration pass
        if not seen and ckpt.exists():
            seen.append(time.time())
        return bool(seen) and time.time() > seen[0] + 0.5

    kill_when(ready, *args, timeout=timeout)


def error_of(args: list[str], capsys) -> str:
    """What ``sage ARGS`` (in-process) prints on stderr; it must exit with status 2 (a user error)."""
    from sage_lightning.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip()


def assert_fit_refused(config: str | Path, run: Path, extra: list[str], needle: str, capsys) -> None:
    """``sage fit`` with ``extra`` ends with one ``sage: error:`` line naming ``needle`` and writes no results."""
    err = error_of(["fit", "--config", str(config), "--trainer.default_root_dir", str(run), *extra], capsys)
    assert err.startswith("sage: error:") and needle in err and len(err.splitlines()) == 1, err
    assert not (run / "results.jsonl").exists()


def results(run: Path) -> list[dict]:
    """The run's ``results.jsonl`` lines, sorted by target id."""
    return sorted(
        (json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()), key=lambda r: r["target"]
    )


def model_args(*files: str) -> dict:
    """``model.init_args`` as ``sage fit`` resolves the config files under configs/ (``--print_config``, in
    process)."""
    import contextlib
    import io

    import yaml

    from sage_lightning.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["fit", *[arg for name in files for arg in ("--config", str(REPO / "configs" / name))], "--print_config"])
    return yaml.safe_load(out.getvalue())["model"]["init_args"]
