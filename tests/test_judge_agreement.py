"""How often D and the judge agree on the clean images, reported in every run that has a judge (ShapesWorld
runs: judge "auto"), for each search (issue 10 item 14)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import lightning as L
import pytest

from sage_lightning.callbacks import ClampPerturbation, FailureWriter, PromptResultWriter, TokenWriter
from sage_lightning.candidates import WordListCandidates
from sage_lightning.datamodules import ClassPromptDataModule, PromptSetDataModule
from sage_lightning.metrics import failure_kind, judge_agreement, judged_summary
from sage_lightning.searches import LatentSearch, PromptSearch, UniversalTokenSearch

COMMON = {"diffusion": "tiny", "num_steps": 2, "guidance_scale": 1.0}


def test_agreement_counts_both_kinds_of_disagreement():
    out = judge_agreement(
        d_failed=[False, True, True, False, False],
        judged=["star", "ring", "star", None, "ring"],
        classes=["star", "star", "star", "star", "ring"],
    )
    assert out == {"images": 5, "agree": 3, "rate": 0.6, "d_fails_judge_sees_class": 1, "d_passes_judge_sees_other": 1}
    assert judge_agreement([], [], [])["rate"] is None


def _record(cls: str, found: bool, clean: str | None, final: str | None, already: bool = False) -> dict:
    return {"class": cls, "found": found, "already_failing": already, "clean_judge": clean, "final_judge": final}


def test_failure_kinds_follow_the_clean_and_final_verdicts():
    assert failure_kind("star", "star", None) == "confirmed"
    assert failure_kind("star", "star", "heart") == "confirmed"
    assert failure_kind("star", "star", "star") == "d_only"
    assert failure_kind("star", None, None) == "pre_existing"  # the judge rejected the clean image already
    assert failure_kind("star", "heart", "ring") == "pre_existing"


def test_ssr_judge_counts_only_targets_whose_clean_image_the_judge_accepts():
    records = [
        _record("star", True, "star", None),  # confirmed
        _record("star", True, "star", "star"),  # D-only
        _record("ring", True, None, None),  # pre-existing: not a discovery, and out of the denominator
        _record("ring", False, "heart", "heart"),  # not found, judge already rejects the clean image
        _record("heart", False, "heart", "heart"),  # searched, nothing found
        _record("heart", True, "heart", None, already=True),  # D already failing: out of everything
    ]
    out = judged_summary(records, searched=6 - 1 + 1)  # 5 searched finished + 1 unfinished (not found)
    assert out == {"already_failing_judge": 2, "searched_judge": 4, "failures_confirmed_by_judge": 1,
                   "failures_d_only": 1, "failures_pre_existing": 1, "ssr_judge": 0.25}
    assert judged_summary([_record("ring", True, None, None)], searched=1)["ssr_judge"] is None


def test_shapesworld_runs_are_judged_by_default():
    assert FailureWriter().judge_of(SimpleNamespace(diffusion_source="shapesworld")) is not None
    assert FailureWriter().judge_of(SimpleNamespace(diffusion_source="tiny")) is None
    assert FailureWriter(judge=None).judge_of(SimpleNamespace(diffusion_source="shapesworld")) is None


def _fit(search, data, writer, tmp_path, callbacks=()) -> tuple[dict, list[dict]]:
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_epochs=2, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[*callbacks, writer],
    )
    trainer.fit(search, datamodule=data)
    summary = json.loads((tmp_path / "summary.json").read_text())
    results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    return summary, results


def test_latent_search_reports_agreement_on_the_clean_images(tmp_path):
    search = LatentSearch(max_iterations=1, **COMMON)
    data = ClassPromptDataModule(classes=["ring", "heart"], seeds_per_class=1, batch_size=2)
    summary, results = _fit(search, data, FailureWriter(judge="shapesworld"), tmp_path, [ClampPerturbation(-1, 1)])
    assert len(results) == 2 and all("clean_judge" in r for r in results)
    expected = judge_agreement(
        [r["already_failing"] for r in results], [r["clean_judge"] for r in results], [r["class"] for r in results]
    )
    assert summary["clean_agreement"] == expected and expected["images"] == 2
    # SSR(J): D's failures the judge confirms (class seen in the clean image, not in the final one), over the
    # searched targets whose clean image the judge accepts
    assert all("final_judge" in r for r in results)
    searched = [r for r in results if not r["already_failing"]]
    accepted = [r for r in searched if r["clean_judge"] == r["class"]]
    confirmed = sum(r["found"] and r["final_judge"] != r["class"] for r in accepted)
    assert summary["failures_confirmed_by_judge"] == confirmed
    assert summary["already_failing_judge"] == len(searched) - len(accepted)
    assert summary["ssr_judge"] == (confirmed / len(accepted) if accepted else None)
    assert summary["clean_judged_as_class"] == sum(r["clean_judge"] == r["class"] for r in results)


def test_prompt_search_reports_agreement_on_every_template_image(tmp_path):
    search = PromptSearch(candidates=WordListCandidates(["red", "blue"]), max_words=1, steps_per_word=1,
                          eval_seeds=3, judge="shapesworld", **COMMON)
    data = ClassPromptDataModule(classes=["ring", "heart"], seeds_per_class=1, batch_size=2)
    summary, results = _fit(search, data, PromptResultWriter(), tmp_path, [ClampPerturbation(-2.5, 2.5)])
    template = [r["rounds"][0] for r in results]
    assert all(len(t["judged"]) == len(t["decisions"]) == 3 for t in template)
    assert summary["clean_agreement"]["images"] == 6
    # SSR(J) gated as the latent search's: only templates the judge accepts (majority of their seeds) count
    accepted = [r for r, t in zip(results, template, strict=True) if not r["already_failing"]
                and sum(j == r["class"] for j in t["judged"]) * 2 > len(t["judged"])]
    searched = sum(not r["already_failing"] for r in results)
    assert summary["ssr_judge_gated"] and summary["already_failing_judge"] == searched - len(accepted)
    confirmed = sum(r["found"] and r["judge"]["confirmed"] for r in accepted)
    assert summary["failures_confirmed_by_judge"] == confirmed
    assert summary["ssr_judge"] == (confirmed / len(accepted) if accepted else None)


def test_prompt_records_take_the_template_as_the_clean_image():
    from sage_lightning.summary import judged_form

    def record(template_shapes, confirmed, found=True):
        return {"class": "star", "found": found, "already_failing": False, "judge": {"confirmed": confirmed},
                "rounds": [{"words": 0, "judged": template_shapes}]}

    assert judged_form(record(["star", "star", None], True))["clean_judge"] == "star"
    assert judged_form(record(["star", None, None], True))["clean_judge"] is None  # the judge rejects the template
    kinds = [failure_kind(f["class"], f["clean_judge"], f["final_judge"]) for f in (
        judged_form(record(["star"] * 3, True)), judged_form(record(["star"] * 3, False)),
        judged_form(record([None] * 3, True)))]
    assert kinds == ["confirmed", "d_only", "pre_existing"]
    assert judged_form({"class": "star", "rounds": [{}]}) is None
    assert judged_form({"class": "star", "rounds": [{"words": 1, "judged": ["star"] * 3}]}) is None  # a word round


@pytest.mark.parametrize("judge", ["shapesworld", None])
def test_universal_token_reports_agreement_on_the_held_out_images_without_token(judge, tmp_path):
    search = UniversalTokenSearch(target="star", max_iterations=1, **COMMON)
    data = PromptSetDataModule(classes=["ring", "heart"], seeds_per_class=1, batch_size=2,
                               held_out_templates=["a drawing of a {}"])
    summary, results = _fit(search, data, TokenWriter(grid_size=2, judge=judge), tmp_path)
    if judge is None:
        assert "clean_agreement" not in summary
        return
    clean = [r["without_token"] for r in results]
    classes = [r["class"] for r in results]
    expected = judge_agreement([c["d_failed"] for c in clean], [c["judge"] for c in clean], classes)
    assert summary["clean_agreement"] == expected and expected["images"] == 2
