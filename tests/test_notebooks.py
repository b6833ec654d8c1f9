"""The notebooks run against the current API (executed cell by cell on the tiny stack)."""

from __future__ import annotations

import json
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run_notebook(path: Path, overrides: dict[str, object]) -> dict:
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    namespace: dict = {}
    exec(compile("".join(cells[0]["source"]), f"{path.name}[0]", "exec"), namespace)
    namespace.update(overrides)
    for i, cell in enumerate(cells[1:], start=1):
        exec(compile("".join(cell["source"]), f"{path.name}[{i}]", "exec"), namespace)
    return namespace


def test_latent_search_notebook_runs_on_tiny(tmp_path, monkeypatch):
    namespace = run_notebook(
        NOTEBOOKS / "latent_search.ipynb",
        {"SOURCE": "tiny", "CLASSES": ["star", "ring"], "SEEDS_PER_CLASS": 1, "MAX_ITERATIONS": 2, "NUM_STEPS": 3,
         "RUN": str(tmp_path / "run")},
    )
    assert len(namespace["rows"]) == 2
    assert len(namespace["verdicts"]) == len(namespace["found"])
