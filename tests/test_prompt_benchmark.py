"""benchmarks/prompt_search.py's world snapshot builds the same D as the shipped default (no model runs)."""

from __future__ import annotations

import json

import torch
from helpers import load_benchmark
from jsonargparse import ArgumentParser

from sage_lightning.models import default_ensemble
from sage_lightning.shapesworld.generator import make_batch
from sage_lightning.surrogate import ClassifierEnsemble

prompt_benchmark = load_benchmark("prompt_search.py", "prompt_benchmark")


def test_snapshot_ensemble_is_the_shipped_default_d(tmp_path):
    """Reject outputs, Canny settings and views included: a snapshot that drops one measures another D."""
    config = json.loads(prompt_benchmark.snapshot_world(tmp_path).read_text())
    parser = ArgumentParser()
    parser.add_argument("--ensemble", type=ClassifierEnsemble)
    snap = parser.instantiate_classes(parser.parse_object({"ensemble": config["model"]["init_args"]["ensemble"]}))
    snap, shipped = snap.ensemble, default_ensemble("shapesworld")
    assert snap.output_names == shipped.output_names and snap.views == shipped.views
    images, _, _, _ = make_batch(4, seed=5)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        torch.testing.assert_close(snap.member_probs(x), shipped.member_probs(x), rtol=1e-4, atol=1e-5)


def _record(target: int, cls: str, reason: str, words: list[str], confirmed: bool | None) -> dict:
    judge = None if confirmed is None else {"confirmed": confirmed, "shapes": []}
    return {"target": target, "class": cls, "reason": reason, "found": bool(words), "words": words,
            "judge": judge, "forward_equivalents": 100 * (1 + len(words))}


def test_the_table_counts_targets_not_classes():
    """Two seeds of one class are two targets: one found and judge-confirmed, one whose template already fails
    (left out of the shares); a second class's target found by D only."""
    rows = [_record(0, "star", "found", ["red"], True), _record(1, "star", "template fails", [], None),
            _record(2, "ring", "found", ["blue", "big"], False)]
    cells = prompt_benchmark.row("SAGE", rows, 12.0)
    assert cells[1:5] == ["3", "1/3", "2/2 (100%)", "1/2 (50%)"]
    assert cells[5:8] == ["250", "1.5", "300"]
