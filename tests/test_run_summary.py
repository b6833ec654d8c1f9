"""What a run reports (issue 10, items 2 and 3): SSR(A) over all targets, the targets that already fail D before
any search reported apart and left out of SSR, a plain word when the trainer stopped before every target
finished, and the name of the search that ran (the random baseline is not "SAGE")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import REPO, results, sage

from sage_lightning.datamodules import ClassPromptDataModule
from sage_lightning.metrics import target_summary
from sage_lightning.searches import RandomLatentSearch

CONFIGS = REPO / "configs"
LATENT = str(CONFIGS / "latent_search_tiny.yaml")


def _run(run: Path, *args: str) -> tuple[list[dict], dict, str]:
    """``sage fit ARGS`` into ``run``: its result lines, summary.json and the one summary line it printed."""
    proc = sage("fit", *args, "--trainer.default_root_dir", str(run))
    (line,) = [line for line in proc.stdout.splitlines() if " summary: " in line]
    return results(run), json.loads((run / "summary.json").read_text()), line


def test_target_summary_leaves_already_failing_out_and_counts_unfinished_as_not_found():
    counts = target_summary([True, True, False, True], [True, False, False, False], targets=6)
    assert counts == {
        "targets": 6, "finished": 4, "unfinished": 2, "already_failing": 1, "searched": 5, "failures": 2,
        "ssr_discriminator": 2 / 5,
    }
    assert target_summary([True], [True], targets=1)["ssr_discriminator"] is None  # nothing left to search


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory) -> tuple[list[dict], dict, str]:
    return _run(tmp_path_factory.mktemp("summary") / "latent", "--config", LATENT)


def test_latent_targets_failing_at_iteration_0_are_reported_apart(latent_run):
    rows, summary, line = latent_run
    already = [r for r in rows if r["already_failing"]]
    assert already, "the tiny stack's ring seeds fail D on their clean image: the case under test"
    assert all(r["found"] and r["iterations"] == 0 for r in already)
    assert not any(r["already_failing"] for r in rows if r["iterations"] > 0)
    searched = len(rows) - len(already)
    failures = sum(r["found"] and not r["already_failing"] for r in rows)
    assert (summary["already_failing"], summary["searched"], summary["failures"]) == (len(already), searched, failures)
    assert summary["ssr_discriminator"] == pytest.approx(failures / searched)
    assert line.startswith("LatentSearch summary:")
    assert f"in {searched} searched targets" in line and f"{len(already)} of 6 targets already failing" in line
    assert "INCOMPLETE" not in line and summary["unfinished"] == 0


def test_prompt_template_that_already_fails_is_reported_apart(tmp_path):
    rows, summary, line = _run(tmp_path / "prompt", "--config", str(CONFIGS / "prompt_search_tiny.yaml"))
    already = [r for r in rows if r["already_failing"]]
    assert already and all(r["reason"] == "template fails" and not r["words"] for r in already)
    searched = len(rows) - len(already)
    assert summary["already_failing"] == len(already) and summary["searched"] == searched
    failures = sum(r["found"] and not r["already_failing"] for r in rows)
    assert summary["ssr_discriminator"] == pytest.approx(failures / searched)
    assert line.startswith("PromptSearch summary:") and f"{len(already)} of 3 targets already failing" in line


def test_random_baseline_through_the_cli_finishes_every_target_and_names_itself(tmp_path):
    rows, summary, line = _run(
        tmp_path / "random", "--config", LATENT, "--config", str(CONFIGS / "random_latent.yaml"),
        "--model.init_args.match_sage_iterations", "3",
    )
    assert [r["target"] for r in rows] == list(range(6)) and summary["unfinished"] == 0
    baseline = RandomLatentSearch(diffusion="tiny", num_steps=4, match_sage_iterations=3)
    baseline.prepare(ClassPromptDataModule(classes=["star"]).targets)
    assert all(r["found"] or r["iterations"] == baseline.max_iterations for r in rows)  # every draw spent
    assert line.startswith("RandomLatentSearch summary:") and "SAGE" not in line


def test_a_run_the_trainer_stops_early_says_so_and_counts_over_all_targets(tmp_path):
    rows, summary, line = _run(tmp_path / "short", "--config", LATENT, "--trainer.max_epochs", "1")
    assert summary["targets"] == 6 and summary["unfinished"] == 6 - len(rows) > 0
    assert summary["searched"] == 6 - summary["already_failing"]  # the unfinished stay in the denominator
    assert summary["ssr_discriminator"] == pytest.approx(summary["failures"] / summary["searched"])
    assert f"INCOMPLETE: {summary['unfinished']} of 6 targets unfinished" in line


def test_summary_line_names_ssr_j_and_the_agreement_once():
    """The judge's part of every summary line (latent, prompt): SSR(J) once, then D/judge agreement (the
    prompt writer printed SSR(J) twice); without a judge nothing."""
    from sage_lightning.callbacks.failure_writer import agreement_note

    judged = {"ssr_judge": 0.35, "clean_agreement": {"images": 20, "agree": 16}}
    assert agreement_note(judged) == ", SSR(J) 0.35, D and judge agree on 16 of 20 clean images"
    assert agreement_note({"ssr_judge": 0.5}) == ", SSR(J) 0.50"
    assert agreement_note({"ssr_judge": None}) == "" and agreement_note({}) == ""


def test_rates_over_nothing_are_none_not_zero():
    from sage_lightning.metrics import non_gaussian_rate, success_rate

    assert success_rate([]) is None and non_gaussian_rate([]) is None
    assert success_rate([True, False, False, False]) == 0.25 and non_gaussian_rate([False, True]) == 0.5


def test_a_run_without_failures_says_ngr_n_a_in_its_line_summary_and_report(tmp_path):
    """No failure found (max_iterations 0: every target ends at its clean image): NGR is over no latents, so the
    line, summary.json and the report say n/a, never 0.00."""
    rows, summary, line = _run(tmp_path / "none", "--config", LATENT, "--model.init_args.max_iterations", "0")
    assert summary["failures"] == 0 and summary["ngr"] is None
    assert "NGR n/a" in line and "NGR 0.00" not in line
    page = (tmp_path / "none" / "report.html").read_text()
    assert "<dt>NGR: share of found latents failing the KS or the chi-norm test (alpha 0.01)</dt><dd>n/a</dd>" in page
