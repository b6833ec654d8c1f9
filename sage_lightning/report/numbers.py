"""The report's numbers: the run summary (SSR(A), SSR(J), NGR, cost per failure) and the per-class table.

``summary.json`` is the writer's own account and is shown as written; a run killed before writing it gets
the same measures recomputed from its finished targets, by the writers' own function
(:func:`sage_lightning.summary.run_summary`), marked unfinished.
"""

from __future__ import annotations

from collections import defaultdict

from sage_lightning.metrics import CONFIRMED, failure_kind, judged_summary
from sage_lightning.report.load import PROMPT, TOKEN, RunData
from sage_lightning.summary import median as _median
from sage_lightning.summary import run_summary as summary_of_results
from sage_lightning.summary import searched_failures

FAILURE_KIND_LABELS = {"confirmed": "confirmed (the generator's)", "d_only": "D-only (the judge still sees the class)",
                       "pre_existing": "pre-existing (the judge rejected the clean image)"}


def failure_kind_of(record: dict) -> str | None:
    """``confirmed`` / ``d_only`` / ``pre_existing`` for a latent failure the judge looked at
    (:func:`~sage_lightning.metrics.failure_kind`); None without a judge or for other searches."""
    if "final_judge" not in record or "clean_judge" not in record:
        return None
    return failure_kind(record["class"], record["clean_judge"], record["final_judge"])


def judge_confirms(record: dict) -> bool | None:
    """The judge's verdict on a found failure: True when it confirms it (for a latent failure: it sees the class
    in the clean image and not in the final one; for a prompt: on most seeds); None when the run has no judge."""
    if "final_judge" in record:
        return failure_kind_of(record) == CONFIRMED
    judge = record.get("judge")
    if isinstance(judge, dict):
        return bool(judge.get("confirmed"))
    return None


def run_summary(run: RunData) -> dict:
    """The summary shown at the top: ``summary.json`` where the run wrote one, else recomputed from the finished
    targets (``targets`` from the config; unknown targets count as unfinished)."""
    if run.summary is not None:
        return dict(run.summary)
    results = run.results
    if run.kind == TOKEN:
        return {"search": run.search, "held_out_prompts": len(results)}
    targets = max(run.targets or 0, len(results))
    return summary_of_results(run.search, results, targets, run.kind)


SUMMARY_LABELS = {
    "search": "search",
    "targets": "targets",
    "finished": "finished targets",
    "unfinished": "unfinished targets (counted as not found)",
    "already_failing": "already failing before any search (left out of SSR)",
    "searched": "searched targets",
    "failures": "failures found by D",
    "ssr_discriminator": "SSR(A): failures / searched targets",
    "already_failing_judge": "already failing for the judge (clean image rejected; left out of SSR(J))",
    "failures_confirmed_by_judge": "failures the judge confirms (the generator's)",
    "failures_d_only": "D-only failures (the judge still sees the class: D was fooled)",
    "failures_pre_existing": "failures on clean images the judge already rejected (not discoveries)",
    "ssr_judge": "SSR(J): failures the judge confirms / searched targets whose clean image it accepts",
    "ngr": "NGR: share of found latents failing the KS or the chi-norm test (alpha 0.01)",
    "median_iterations_per_failure": "median iterations per failure",
    "median_words_per_failure": "median added words per failure",
    "median_unet_evaluations_per_failure": "median UNet evaluations per failure",
    "median_forward_equivalents_per_failure": "median forward-equivalents per failure",
}


NOT_APPLICABLE = "n/a"  # a measure over nothing (no failures, no searched targets): never shown as 0


def measure(value: object) -> object:
    """A summary value as the page shows it: None (a rate or median over nothing) as ``n/a``."""
    return NOT_APPLICABLE if value is None else value


def summary_items(run: RunData, summary: dict) -> list[tuple[str, object]]:
    """``(label, value)`` pairs of the summary list: the model first, then the paper's measures in order."""
    items: list[tuple[str, object]] = [("search", run.search), ("model (diffusion)", run.model)]
    if run.kind == TOKEN:
        shown_apart = ("search", "clean_agreement", "hit_rate_ensemble", "hit_rate_judge", "clip_score")  # table
        keys = [k for k in summary if k not in shown_apart]
        return items + [(k.replace("_", " "), measure(summary[k])) for k in keys]
    for key, label in SUMMARY_LABELS.items():
        if key in summary and key != "search":
            items.append((label, measure(summary[key])))
    agreement = summary.get("clean_agreement")
    if isinstance(agreement, dict) and agreement.get("images"):
        items.append(("D and judge agree on clean images", f"{agreement['agree']} of {agreement['images']}"))
    return items


def class_rows(run: RunData) -> list[dict]:
    """One row per class: targets, already failing, searched, failures, SSR(A), SSR(J) (with a judge), median
    iterations (latent) or words (prompt) per failure. Token runs: held-out hit rates per class."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in run.results:
        groups[str(r.get("class"))].append(r)
    rows = []
    for name in sorted(groups):
        records = groups[name]
        if run.kind == TOKEN:
            rows.append({"class": name, "held-out prompts": len(records),
                         **{f"hit rate {side.split('_')[0]} token": measure(_share([r[side]["hit"] for r in records]))
                            for side in ("with_token", "without_token")}})
            continue
        already = sum(bool(r.get("already_failing")) for r in records)
        found = searched_failures(records)
        searched = len(records) - already
        row = {"class": name, "targets": len(records), "already failing": already, "searched": searched,
               "failures": len(found), "SSR(A)": measure(len(found) / searched if searched else None)}
        if records and all("clean_judge" in r for r in records):
            row["SSR(J)"] = measure(judged_summary(records, searched)["ssr_judge"])
        elif any(r.get("judge") is not None for r in records):
            row["SSR(J)"] = measure(sum(bool(judge_confirms(r)) for r in found) / searched if searched else None)
        key = "iterations" if run.kind != PROMPT else "words"
        row[f"median {key} per failure"] = _median(
            [r["iterations"] if key == "iterations" else len(r.get("words") or []) for r in found])
        rows.append(row)
    return rows


def _share(flags: list[bool]) -> float | None:
    return sum(bool(f) for f in flags) / len(flags) if flags else None
