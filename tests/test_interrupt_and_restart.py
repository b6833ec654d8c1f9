"""A run stopped with Ctrl-C keeps what it found (report, resume hint) and resumes; a fresh start in a folder
that a failed start left a config in writes its own config."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import yaml
from helpers import ENV, REPO, SAGE, results, sage

TINY = str(REPO / "configs" / "latent_search_tiny.yaml")
LONGER = ["--model.init_args.max_iterations", "8"]


def _interrupt_after_first_checkpoint(run: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """``sage fit`` into ``run``, SIGINT (Ctrl-C) once its first per-pass checkpoint exists."""
    proc = subprocess.Popen(
        [*SAGE, "fit", "--config", TINY, "--trainer.default_root_dir", str(run), *LONGER],
        env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # even if pytest runs in background
    )
    deadline = time.time() + timeout
    while not (run / "checkpoints" / "last.ckpt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted: make the config longer"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_ctrl_c_writes_the_report_of_what_was_found_and_the_run_resumes_to_the_end(tmp_path):
    run = tmp_path / "run"
    stopped = _interrupt_after_first_checkpoint(run)
    assert stopped.returncode != 0
    hint = f"resume with: sage fit --config {run / 'config.yaml'} --ckpt_path last"
    assert hint in stopped.stderr, stopped.stderr[-2000:]
    assert "sage: stopping after this step" in stopped.stderr  # the first Ctrl-C is never lost, wherever it lands
    assert not (run / "summary.json").exists()
    report = run / "report.html"
    assert report.is_file() and str(report.resolve()) in stopped.stdout
    assert "<html" in report.read_text().lower()
    sage("fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last")
    summary = json.loads((run / "summary.json").read_text())
    assert [r["target"] for r in results(run)] == list(range(summary["targets"]))


def test_a_fresh_start_replaces_the_config_a_failed_start_left_behind(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stale = yaml.safe_load(Path(TINY).read_text())
    stale["model"]["init_args"]["max_iterations"] = 5
    (run / "config.yaml").write_text(yaml.safe_dump(stale))  # no results: that start wrote nothing else
    sage("fit", "--config", TINY, "--trainer.default_root_dir", str(run), "--model.init_args.max_iterations", "1")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["init_args"]["max_iterations"] == 1
    assert saved["trainer"]["default_root_dir"] == str(run)
