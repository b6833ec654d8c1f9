"""The notebooks run against the current API (executed cell by cell on the tiny stack)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run_notebook(
    path: Path, overrides: dict[str, object], after: dict[int, Callable[[dict], None]] | None = None
) -> dict:
    """Run the code cells of ``path`` in one namespace, the first (parameters) overridden by ``overrides``;
    ``after[i](namespace)`` runs after code cell ``i``."""
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    namespace: dict = {}
    exec(compile("".join(cells[0]["source"]), f"{path.name}[0]", "exec"), namespace)
    namespace.update(overrides)
    for i, cell in enumerate(cells[1:], start=1):
        exec(compile("".join(cell["source"]), f"{path.name}[{i}]", "exec"), namespace)
        if after and i in after:
            after[i](namespace)
    return namespace


def test_latent_search_notebook_runs_on_tiny(tmp_path, monkeypatch):
    namespace = run_notebook(
        NOTEBOOKS / "latent_search.ipynb",
        {"SOURCE": "tiny", "CLASSES": ["star", "ring"], "SEEDS_PER_CLASS": 1, "MAX_ITERATIONS": 2, "NUM_STEPS": 3,
         "RUN": str(tmp_path / "run")},
    )
    assert len(namespace["rows"]) == 2
    assert len(namespace["verdicts"]) == len(namespace["found"])


ANALYSES = ("prompt_independence", "failure_kind", "region", "failure_types")


def _count_failing_clean_seeds_as_found(namespace: dict) -> None:
    """The tiny search finds few failures in one iteration: count its failing clean seeds as found (as
    tests/test_analysis.py does), so every analysis has failures to work on."""
    from sage_lightning.results import RunFolder

    folder = RunFolder(namespace["RUN"])
    records = folder.read_results()
    for r in records:
        r["already_failing"] = False
    folder.results_path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def test_analysis_notebook_runs_search_report_and_the_four_analyses_on_tiny(tmp_path):
    from PIL import Image

    namespace = run_notebook(
        NOTEBOOKS / "analysis.ipynb",
        {"SOURCE": "tiny", "CLASSES": ["star", "ring", "heart"], "SEEDS_PER_CLASS": 1, "MAX_ITERATIONS": 1,
         "NUM_STEPS": 3, "RUN": str(tmp_path / "run"), "MAX_LATENTS": 3, "RADII": "0.1,0.4",
         "SAMPLES_PER_RADIUS": 2, "PRIOR_DRAWS": 2, "MAX_K": 2, "DEVICE": "cpu"},
        after={1: _count_failing_clean_seeds_as_found},  # code cell 1 is the search
    )
    run = tmp_path / "run"
    found = len(namespace["failures"])
    assert len(namespace["rows"]) == 3 and found >= 1, "the tiny run must leave failures for the analyses"
    for name in ANALYSES:
        data = json.loads((run / "analysis" / f"{name}.json").read_text())
        assert set(data) == {"title", "summary", "rows", "images", "notes"} and data["images"]
        assert all((run / image).is_file() for image in data["images"])
    independence, kind = namespace["independence"], namespace["kind"]
    assert independence["summary"]["latents"] == found == independence["summary"]["reproduced_under_own_prompt"]
    assert all(r["prompts"] == 9 + 3 and 0 <= r["share"] <= 1 for r in independence["rows"])  # other classes + styles
    assert kind["summary"]["decided_by"] == "ensemble proxy" and sum(r["failures"] for r in kind["rows"]) == found
    region = namespace["region"]
    assert len(region["rows"]) == found and all(0 <= r["p_fail@0.1"] <= 1 for r in region["rows"])
    assert region["summary"]["prior_draws"] == 2 and region["summary"]["radii"] == "0.1,0.4"
    types = namespace["types"]
    assert sum(r["count"] for r in types["rows"] if r["grouping"] == "drawn instead") == found
    for result in (independence, kind, region, types):  # each analysis's figure is shown, not the fallback text
        assert isinstance(namespace["figure"](result), Image.Image)
    assert namespace["sections"] == sorted(ANALYSES)  # the report page has a section per analysis
    html = (run / "report.html").read_text()
    for name in ANALYSES:
        for image in json.loads((run / "analysis" / f"{name}.json").read_text())["images"]:
            assert image in html
