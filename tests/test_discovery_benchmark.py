"""benchmarks/discovery.py's bookkeeping (no model runs): one budget for every method, and the statistics."""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys

import pytest
from helpers import REPO

from sage_lightning.sampler import FullGradient, ResidualGradient
from sage_lightning.searches import LatentSearch, RandomLatentSearch

spec = importlib.util.spec_from_file_location("discovery", REPO / "benchmarks" / "discovery.py")
discovery = importlib.util.module_from_spec(spec)
sys.modules["discovery"] = discovery  # its dataclass looks its module up
spec.loader.exec_module(discovery)


@pytest.mark.parametrize("iterations", [1, 2, 20])
def test_every_method_gets_the_same_forward_equivalent_budget(iterations, tmp_path):
    args = argparse.Namespace(config=str(REPO / "configs" / "latent_search_tiny.yaml"), num_steps=None,
                              iterations=iterations, out=str(tmp_path))
    methods, info = discovery.plan(args)
    settings = {k: info[k] for k in ("diffusion", "scheduler", "num_steps", "guidance_scale")}
    budget = info["budget_forward_equivalents"]
    assert budget == LatentSearch(grad_mode=ResidualGradient(0.5, 1.0), **settings).forward_equivalents(iterations)
    by_name = {m.name: m for m in methods}
    assert list(by_name) == ["SAGE residual", "SAGE full gradient", "local random uniform", "local random corners",
                             "fresh seeds"]
    full = LatentSearch(grad_mode=FullGradient(), **settings)
    n_full = int(by_name["SAGE full gradient"].args["--model.init_args.max_iterations"])
    assert full.forward_equivalents(n_full) <= budget < full.forward_equivalents(n_full + 1)
    baseline = RandomLatentSearch(**settings)
    for name in ("local random uniform", "local random corners", "fresh seeds"):
        draws = int(by_name[name].args["--model.init_args.max_iterations"])
        assert by_name[name].args["--model.init_args.match_sage_iterations"] == "null"
        assert baseline.forward_equivalents(draws) <= budget < baseline.forward_equivalents(draws + 1)
    assert by_name["local random corners"].args["--model.init_args.mode"] == "corners"


def _outcome(cls: str, found: bool, already: bool = False, confirmed: bool = False, cost: int = 10) -> dict:
    return {"class": cls, "already": already, "found": found, "confirmed": confirmed and found, "cost": cost,
            "outlier": False}


def test_already_failing_targets_are_left_out_of_every_method_and_intervals_hold_the_estimate():
    results = {
        "A": {0: _outcome("star", True, already=True), 1: _outcome("star", True, confirmed=True, cost=30),
              2: _outcome("star", False), 3: _outcome("ring", True, cost=50), 4: _outcome("ring", False)},
        "B": {0: _outcome("star", False), 1: _outcome("star", False), 2: _outcome("star", False),
              3: _outcome("ring", False), 4: _outcome("ring", True, cost=70)},
    }
    rows, already = discovery.summarise(results, resamples=300, seed=0)
    assert already == [0]  # already failing in A: out of B's rates as well
    overall = {r["method"]: r for r in rows if r["class"] == discovery.ALL}
    assert overall["A"]["targets"] == overall["B"]["targets"] == 4
    assert overall["A"]["ssr_a"] == 0.5 and overall["A"]["ssr_j"] == 0.25 and overall["A"]["median_cost"] == 40
    assert overall["B"]["ssr_a"] == 0.25 and math.isnan(discovery.statistics_of([_outcome("x", False)])["ngr"])
    for row in rows:
        for key, (low, high) in row["intervals"].items():
            assert low <= row[key] <= high
    star = next(r for r in rows if r["method"] == "A" and r["class"] == "star")
    assert star["targets"] == 2 and star["ssr_a"] == 0.5
    diff = {r["method"]: r for r in discovery.paired_differences(results, already, "B", 300, 0)}
    assert set(diff) == {"A"} and diff["A"]["ssr_a"] == pytest.approx(0.25)
    same = discovery.paired_differences({"A": results["A"], "B": results["A"]}, already, "B", 300, 0)
    assert same[0]["ssr_a"] == 0 and same[0]["intervals"]["ssr_a"] == (0.0, 0.0)


def test_resume_keeps_finished_methods_resumes_killed_ones_and_reruns_the_rest(tmp_path, monkeypatch):
    """--resume: a run with summary.json is read, not re-run; one with a checkpoint resumes from it; a folder with
    neither starts afresh (removed first). Several processes can so share one --out, one method each."""
    calls: list[list[str]] = []
    monkeypatch.setattr(discovery, "sage_main", lambda argv: calls.append(argv))
    method = discovery.Method("local random uniform", [], {})
    args = argparse.Namespace(out=str(tmp_path), resume=True, num_steps=4, config=str(REPO / "configs" /
                              "latent_search_tiny.yaml"), classes="all", seeds=1, accelerator="cpu", batch_size=None)
    run = tmp_path / "local_random_uniform"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    discovery.run_method(method, args)
    assert calls[-1] == ["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last"]
    (run / "summary.json").write_text("{}")
    discovery.run_method(method, args)
    assert len(calls) == 1  # finished: not run again
    args.resume = False
    discovery.run_method(method, args)
    assert not run.exists() and calls[-1][:2] == ["fit", "--config"] and "--ckpt_path" not in calls[-1]
