"""Read a run folder for the report: results, summary, config and CSV logs, as written by the searches.

Nothing here writes. A run killed mid-way (a partial ``results.jsonl``, no ``summary.json``) loads too:
:attr:`RunData.finished` is False and the page says "run unfinished".
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sage_lightning.errors import SageError
from sage_lightning.results import RESULTS, RunFolder
from sage_lightning.summary import LATENT, PROMPT

TOKEN = "token"  # LATENT and PROMPT: the kinds of result lines sage_lightning.summary knows


@dataclass
class RunData:
    """One run folder's outputs (``results`` sorted by target id)."""

    root: Path
    results: list[dict]
    summary: dict | None
    config: dict
    metrics: list[dict[str, float]] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """``latent`` (latent search and its random baselines), ``prompt`` or ``token`` (universal token)."""
        first = self.results[0] if self.results else {}
        if "with_token" in first or "token" in self.search.lower():
            return TOKEN
        if "template" in first or "prompt" in self.search.lower():
            return PROMPT
        return LATENT

    @property
    def finished(self) -> bool:
        """The run ended normally (its writer wrote ``summary.json``) and no target was left unfinished."""
        return self.summary is not None and not self.summary.get("unfinished")

    @property
    def search(self) -> str:
        """The search's class name (from ``summary.json``, else from ``config.yaml``)."""
        if self.summary and self.summary.get("search"):
            return str(self.summary["search"])
        path = str(self.model_config.get("class_path") or "")
        return path.rpartition(".")[2] or ("UniversalTokenSearch" if self.summary and "target_class" in self.summary
                                           else "unknown search")

    @property
    def model_config(self) -> dict:
        model = self.config.get("model") or {}
        return model if isinstance(model, dict) else {}

    @property
    def model(self) -> str:
        """The text-to-image model searched (``model.init_args.diffusion``)."""
        args = self.model_config.get("init_args") or {}
        return str(args.get("diffusion") or "unknown")

    @property
    def max_iterations(self) -> int | None:
        args = self.model_config.get("init_args") or {}
        value = args.get("max_iterations")
        return int(value) if isinstance(value, int) else None

    @property
    def targets(self) -> int | None:
        """Targets of the run: ``summary.json``'s count, else the config's classes x templates x seeds (None when
        the config names ``classes: all``, which needs D's class list)."""
        if self.summary and isinstance(self.summary.get("targets"), int):
            return int(self.summary["targets"])
        data = (self.config.get("data") or {}).get("init_args") or {}
        classes = data.get("classes")
        if not isinstance(classes, list) or self.kind == TOKEN:
            return None
        return len(classes) * len(data.get("templates") or [None]) * int(data.get("seeds_per_class") or 1)


def read_metrics(root: Path) -> list[dict[str, float]]:
    """Every row of ``logs/**/metrics.csv`` (versions in order: a resumed run continues its epochs), numbers only."""
    rows: list[dict[str, float]] = []
    for path in sorted((root / "logs").glob("**/metrics.csv"), key=lambda p: (len(p.parts), str(p))):
        with open(path, newline="") as f:
            for raw in csv.DictReader(f):
                row = {}
                for key, value in raw.items():
                    try:
                        number = float(value)
                    except (TypeError, ValueError):
                        continue
                    if math.isfinite(number):
                        row[key] = number
                rows.append(row)
    return rows


def _read_json_or_none(path: Path) -> dict | None:
    import json

    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a summary cut by a kill: the report recomputes what it can
    return value if isinstance(value, dict) else None


def load_run(root: str | Path) -> RunData:
    """The run in ``root``; SageError (one line, with the fix) when it is not a run folder."""
    folder = Path(root)
    if not folder.exists():
        raise SageError(f"run folder {str(root)!r} does not exist: give the folder of a sage run (its "
                        "--trainer.default_root_dir, e.g. runs/latent_search)")
    if not folder.is_dir():
        raise SageError(f"{str(root)!r} is a file, not a run folder: give the folder that holds results.jsonl")
    if not (folder / RESULTS).is_file():
        raise SageError(f"{str(root)!r} holds no {RESULTS}: it is not a sage run folder, or the run wrote no "
                        "result yet; give the folder of a run that finished at least one target")
    try:
        results = sorted(RunFolder(folder).read_results(), key=lambda r: int(r.get("target", 0)))
    except ValueError as err:
        raise SageError(f"{str(folder / RESULTS)!r} is not JSON lines ({err}): it is not a sage results file") from err
    try:
        config = yaml.safe_load((folder / "config.yaml").read_text()) if (folder / "config.yaml").is_file() else {}
    except yaml.YAMLError:
        config = {}
    return RunData(folder, results, _read_json_or_none(folder / "summary.json"),
                   config if isinstance(config, dict) else {}, read_metrics(folder))


def analyses(root: Path) -> list[tuple[str, dict | None]]:
    """``(name, content)`` of every ``analysis/*.json`` in the run, sorted by name (None: unreadable)."""
    return [(path.stem, _read_json_or_none(path)) for path in sorted((root / "analysis").glob("*.json"))]
