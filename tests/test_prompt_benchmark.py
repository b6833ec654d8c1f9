"""benchmarks/prompt_search.py's world snapshot builds the same D as the shipped default (no model runs)."""

from __future__ import annotations

import importlib.util
import json
import sys

import torch
from helpers import REPO
from jsonargparse import ArgumentParser

from sage_lightning.models import default_ensemble
from sage_lightning.shapesworld.generator import make_batch
from sage_lightning.surrogate import ClassifierEnsemble

spec = importlib.util.spec_from_file_location("prompt_benchmark", REPO / "benchmarks" / "prompt_search.py")
prompt_benchmark = importlib.util.module_from_spec(spec)
sys.modules["prompt_benchmark"] = prompt_benchmark
spec.loader.exec_module(prompt_benchmark)


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
