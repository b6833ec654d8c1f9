"""A run's ``summary.json`` from its result lines: one function for the writers and for the report.

The writers (``sage_lightning.callbacks.FailureWriter``, ``sage_lightning.callbacks.PromptResultWriter``) write
it when a run ends; the report (:func:`sage_lightning.report.numbers.run_summary`) recomputes it the same way
for a run killed before that, from the finished targets (the unfinished ones count as not found). The universal
token's summary is another account (hit rates over held-out prompts) and stays with its writer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sage_lightning.metrics import judge_agreement, judged_summary, non_gaussian_rate, target_summary

LATENT, PROMPT = "latent", "prompt"  # result lines of the latent searches, of the prompt searches


def median(values: Sequence[float]) -> float | None:
    """The median as ``summary.json`` has always recorded it (``torch.median``: the lower of the two middle
    values for an even count); None over nothing (a median per failure of a run without failures)."""
    return float(torch.tensor(list(values), dtype=torch.float64).median()) if values else None


def majority(decisions: Sequence[bool]) -> bool:
    """A strict majority of the seeds fails (METHOD.md: the failure belongs to the prompt)."""
    return sum(bool(d) for d in decisions) * 2 > len(decisions)


def searched_failures(results: list[dict]) -> list[dict]:
    """Targets where D declared a failure that the search found (already-failing targets left out of SSR)."""
    return [r for r in results if r.get("found") and not r.get("already_failing")]


def _median_of(records: list[dict], key: str) -> float | None:
    return median([r[key] for r in records if key in r])  # lines of older versions may lack a cost


def judged_form(record: dict) -> dict | None:
    """A prompt target in the form :func:`~sage_lightning.metrics.judged_summary` counts: its bare template's
    images stand for the clean image (the judge accepts it when a strict majority of the S seeds show the
    class), the final prompt's verdict for the final image (``confirmed``: rejected on the seeds D failed on).
    None when the bare template was not judged."""
    first = (record.get("rounds") or [{}])[0]
    if first.get("words") != 0 or first.get("judged") is None:  # no bare-template round (check_template off)
        return None
    accepted = majority([shape == record["class"] for shape in first["judged"]])
    confirmed = bool(record["judge"] and record["judge"]["confirmed"])
    return {"class": record["class"], "found": record["found"], "already_failing": record["already_failing"],
            "clean_judge": record["class"] if accepted else None,
            "final_judge": None if confirmed else record["class"]}


def run_summary(search: str, results: list[dict], targets: int, kind: str) -> dict:
    """``summary.json`` of a latent (``kind`` :data:`LATENT`) or prompt (:data:`PROMPT`) run: SSR(A) over its
    ``targets``, cost per failure, and where the run has a judge SSR(J) and how often D and the judge agree on the
    clean images; latent runs also NGR."""
    found = searched_failures(results)
    counts = target_summary([bool(r.get("found")) for r in results], [bool(r.get("already_failing")) for r in results],
                            targets)
    summary: dict = {"search": search, **counts}
    if kind == LATENT:
        summary["ngr"] = non_gaussian_rate([r["ngr"]["outlier"] for r in found if "ngr" in r])
        summary["median_iterations_per_failure"] = _median_of(found, "iterations")
    else:
        summary["median_words_per_failure"] = median([len(r.get("words") or []) for r in found])
    summary["median_unet_evaluations_per_failure"] = _median_of(found, "unet_evaluations")
    summary["median_forward_equivalents_per_failure"] = _median_of(found, "forward_equivalents")
    summary.update(_latent_judge(results, counts) if kind == LATENT else _prompt_judge(results, found, counts))
    return summary


def _latent_judge(results: list[dict], counts: dict) -> dict:
    judged = [r for r in results if "clean_judge" in r]  # D's clean decision: failing at iteration 0
    if not judged:
        return {}
    # SSR(J): failures the judge confirms, over targets whose clean image it accepts (judged_summary)
    return {**judged_summary(judged, counts["searched"]),
            "clean_judged_as_class": sum(r["clean_judge"] == r["class"] for r in judged),
            "clean_agreement": judge_agreement([r["already_failing"] for r in judged],
                                               [r["clean_judge"] for r in judged], [r["class"] for r in judged])}


def _prompt_judge(results: list[dict], found: list[dict], counts: dict) -> dict:
    out: dict = {}
    judged = [judged_form(r) for r in results]
    if judged and all(j is not None for j in judged):  # SSR(J) gated on the bare template, as the latent's
        out.update(judged_summary(judged, counts["searched"]), ssr_judge_gated=True)
    elif any(r.get("judge") is not None for r in results):  # templates never judged: SSR(J) cannot be gated
        confirmed = sum(bool(r["judge"] and r["judge"]["confirmed"]) for r in found)
        out.update(failures_confirmed_by_judge=confirmed, ssr_judge_gated=False,
                   ssr_judge=confirmed / counts["searched"] if counts["searched"] else None)
    clean = [(r, rnd) for r in results for rnd in (r.get("rounds") or [])[:1] if rnd.get("judged") is not None]
    if clean:  # per seed of each bare template
        out["clean_agreement"] = judge_agreement(
            [d for _, rnd in clean for d in rnd["decisions"]],
            [j for _, rnd in clean for j in rnd["judged"]],
            [r["class"] for r, rnd in clean for _ in rnd["decisions"]],
        )
    return out
