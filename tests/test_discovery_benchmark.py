"""benchmarks/discovery.py's bookkeeping (no model runs): one budget for every method, and the statistics."""

from __future__ import annotations

import argparse
import math

import pytest
from helpers import REPO, load_benchmark

from sage_lightning.analysis.target_statistics import statistics_of
from sage_lightning.sampler import FullGradient, ResidualGradient
from sage_lightning.searches import LatentSearch, RandomLatentSearch

discovery = load_benchmark("discovery.py", "discovery")


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
                             "local random sign walk", "fresh seeds"]
    full = LatentSearch(grad_mode=FullGradient(), **settings)
    n_full = int(by_name["SAGE full gradient"].args["--model.init_args.max_iterations"])
    assert full.forward_equivalents(n_full) <= budget < full.forward_equivalents(n_full + 1)
    baseline = RandomLatentSearch(**settings)
    for name in ("local random uniform", "local random corners", "local random sign walk", "fresh seeds"):
        draws = int(by_name[name].args["--model.init_args.max_iterations"])
        assert by_name[name].args["--model.init_args.match_sage_iterations"] == "null"
        assert baseline.forward_equivalents(draws) <= budget < baseline.forward_equivalents(draws + 1)
    assert by_name["local random corners"].args["--model.init_args.mode"] == "corners"
    # the sign walk: the same draws as the other local nulls, each a step of SAGE's own lr (its config's)
    assert by_name["local random sign walk"].args["--model.init_args.mode"] == "sign_walk"
    assert by_name["local random sign walk"].configs == by_name["local random uniform"].configs


def _outcome(cls: str, found: bool, already: bool = False, confirmed: bool = False, cost: int = 10,
             judge_already: bool = False) -> dict:
    return {"class": cls, "already": already, "found": found, "confirmed": confirmed and found, "cost": cost,
            "d_only": found and not confirmed, "outlier": False, "judge_already": judge_already}


def test_targets_the_judge_already_rejects_are_left_out_and_d_only_failures_counted_apart():
    results = {"A": {0: _outcome("star", True, judge_already=True), 1: _outcome("star", True, confirmed=True),
                     2: _outcome("star", True), 3: _outcome("ring", False)}}
    rows, already = discovery.summarise(results, resamples=50, seed=0)
    assert already == [0]
    overall = next(r for r in rows if r["class"] == discovery.ALL)
    assert overall["targets"] == 3 and overall["ssr_a"] == pytest.approx(2 / 3)
    assert overall["ssr_j"] == pytest.approx(1 / 3) and overall["d_only"] == pytest.approx(1 / 3)


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
    assert overall["B"]["ssr_a"] == 0.25 and math.isnan(statistics_of([_outcome("x", False)])["ngr"])
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
                              "latent_search_tiny.yaml"), classes="all", seeds=1, accelerator="cpu", batch_size=None,
                              base_seed=9_000_000)
    run = tmp_path / "local_random_uniform"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    _write_config(run, seeds_per_class=1)
    discovery.run_method(method, args)
    assert calls[-1] == ["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last"]
    (run / "summary.json").write_text("{}")
    discovery.run_method(method, args)
    assert len(calls) == 1  # finished: not run again
    args.resume = False
    discovery.run_method(method, args)
    assert not run.exists() and calls[-1][:2] == ["fit", "--config"] and "--ckpt_path" not in calls[-1]


def _write_config(run, seeds_per_class: int, base_seed: int = 9_000_000) -> None:
    import yaml

    (run / "config.yaml").write_text(yaml.safe_dump({
        "model": {"init_args": {"num_steps": 4}},
        "data": {"init_args": {"classes": "all", "seeds_per_class": seeds_per_class, "base_seed": base_seed,
                               "distinct_seeds": True}}}))


def test_resume_refuses_a_kept_run_of_another_plan(tmp_path, monkeypatch):
    """A finished run of 2 seeds per class is not reused when the plan says 3 (or another base seed): its rows
    would sit under the new budget's heading."""
    monkeypatch.setattr(discovery, "sage_main", lambda argv: pytest.fail("a run of another plan was run or reused"))
    args = argparse.Namespace(out=str(tmp_path), resume=True, num_steps=4, config=str(REPO / "configs" /
                              "latent_search_tiny.yaml"), classes="all", seeds=3, accelerator="cpu", batch_size=None,
                              base_seed=9_000_000)
    run = tmp_path / "local_random_uniform"
    run.mkdir()
    (run / "summary.json").write_text("{}")
    _write_config(run, seeds_per_class=2)
    with pytest.raises(SystemExit, match="seeds_per_class 2 .now 3."):
        discovery.run_method(discovery.Method("local random uniform", [], {}), args)
    _write_config(run, seeds_per_class=3, base_seed=0)
    with pytest.raises(SystemExit, match="base_seed 0"):
        discovery.run_method(discovery.Method("local random uniform", [], {}), args)
    _write_config(run, seeds_per_class=3)
    assert discovery.run_method(discovery.Method("local random uniform", [], {}), args) == (run, 0.0)
