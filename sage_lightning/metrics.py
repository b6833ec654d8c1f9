"""Run metrics of SAGE: non-Gaussian rate (NGR) statistics, success rates (SSR), cost per failure."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from scipy import stats


def gaussianity(z: torch.Tensor, alpha: float = 0.01) -> dict[str, float | bool]:
    """NGR check of one latent against N(0, I) (METHOD.md, "NGR"): two tests at level ``alpha``.

    - Kolmogorov-Smirnov of the entries against N(0, 1) (``ks_pvalue``): the entries' distribution;
    - the chi-norm test (``norm_pvalue``): |z|^2 of a N(0, I_d) sample is chi-squared with d degrees of
      freedom, two-sided; a latent whose norm is far from sqrt(d) fails it even when its entries pass KS.

    ``outlier`` is True when either test rejects (``ks_outlier``, ``norm_outlier`` say which);
    ``norm_ratio`` is |z| / sqrt(d).
    """
    flat = z.detach().double().flatten().cpu()
    d = flat.numel()
    ks_p = float(stats.kstest(flat.numpy(), "norm").pvalue)
    sq = float(flat.pow(2).sum())
    norm_p = float(min(1.0, 2 * min(stats.chi2.cdf(sq, d), stats.chi2.sf(sq, d))))
    return {
        "ks_pvalue": ks_p,
        "norm_pvalue": norm_p,
        "norm_ratio": math.sqrt(sq / d),
        "ks_outlier": bool(ks_p < alpha),
        "norm_outlier": bool(norm_p < alpha),
        "outlier": bool(ks_p < alpha or norm_p < alpha),
    }


def success_rate(found: Sequence[bool]) -> float | None:
    """SSR: share of targets with a failure found (by D, or by the judge for SSR(J)); None for no targets."""
    return float(sum(bool(f) for f in found) / len(found)) if found else None


def non_gaussian_rate(outliers: Sequence[bool]) -> float | None:
    """NGR: share of found latents that fail the normality test; None when nothing was found (not 0: a run
    without failures has no latents to be Gaussian or not)."""
    return float(sum(bool(o) for o in outliers) / len(outliers)) if outliers else None


def target_summary(
    found: Sequence[bool], already_failing: Sequence[bool], targets: int
) -> dict[str, int | float | None]:
    """SSR(A) over all ``targets`` of a run from its finished targets' records (METHOD.md, "What a run
    reports"; issue 10 items 2-3).

    ``found[i]``: D declared a failure for finished target i; ``already_failing[i]``: it did so on the clean
    image (latent z0, iteration 0) or the bare template, before any search. SAGE searches from samples the
    model gets right, so those are in neither the numerator nor the denominator; targets the run never
    finished count as not found (``unfinished`` says how many). ``ssr_discriminator`` is None when no target
    was left to search.
    """
    if len(found) != len(already_failing) or len(found) > targets:
        raise ValueError(f"{len(found)} found flags, {len(already_failing)} already-failing flags, {targets} targets")
    already = sum(bool(a) for a in already_failing)
    failures = sum(bool(f) and not bool(a) for f, a in zip(found, already_failing, strict=True))
    searched = targets - already
    return {
        "targets": targets,
        "finished": len(found),
        "unfinished": targets - len(found),
        "already_failing": already,
        "searched": searched,
        "failures": failures,
        "ssr_discriminator": failures / searched if searched else None,
    }


def judge_agreement(d_failed: Sequence[bool], judged: Sequence[str | None], classes: Sequence[str]) -> dict:
    """How often D and the independent judge agree on clean images (issue 10 item 14): they agree on an image
    when D declares a failure exactly when the judge does not see the image's class. Reported in every
    ShapesWorld run, so a failure rule too lenient (or too strict) for the world shows at once.

    ``d_failed[i]``: D's decision on clean image i; ``judged[i]``: the shape the judge sees (None: none);
    ``classes[i]``: the class the image was generated for.
    """
    if not len(d_failed) == len(judged) == len(classes):
        raise ValueError(f"{len(d_failed)} decisions, {len(judged)} verdicts, {len(classes)} classes")
    rows = [(bool(f), j != c) for f, j, c in zip(d_failed, judged, classes, strict=True)]
    agree = sum(f == wrong for f, wrong in rows)
    return {
        "images": len(rows),
        "agree": agree,
        "rate": agree / len(rows) if rows else None,
        "d_fails_judge_sees_class": sum(f and not wrong for f, wrong in rows),
        "d_passes_judge_sees_other": sum(wrong and not f for f, wrong in rows),
    }


# What a failure D declared is, by the judge (METHOD.md, "What a run reports"; issue 19 item 1).
CONFIRMED = "confirmed"  # the judge sees the class in the clean image and not in the final one: the generator's
D_ONLY = "d_only"  # the judge still sees the class in the final image: D was fooled
PRE_EXISTING = "pre_existing"  # the judge already rejects the clean image: nothing was discovered
FAILURE_KINDS = (CONFIRMED, D_ONLY, PRE_EXISTING)


def failure_kind(class_name: str, clean_judge: str | None, final_judge: str | None) -> str:
    """The kind of a failure D declared on a searched target, from the judge's shapes on its clean image (z0)
    and its final image: ``pre_existing`` when the judge does not see the class in the clean image,
    ``confirmed`` when it sees it there but not in the final image, ``d_only`` when it sees it in both."""
    if clean_judge != class_name:
        return PRE_EXISTING
    return CONFIRMED if final_judge != class_name else D_ONLY


def judged_summary(records: Sequence[dict], searched: int) -> dict[str, int | float | None]:
    """SSR(J) gated on the judge: a target counts only if the judge accepts its clean image as the class and
    rejects the final one (``failure_kind`` confirmed). Targets whose clean image the judge rejects are
    *already failing for the judge*, reported apart and left out of SSR(J)'s denominator, as D's already-failing
    ones are left out of ``searched``.

    ``records``: finished targets with ``class``, ``found``, ``already_failing``, ``clean_judge``,
    ``final_judge``; ``searched``: the run's searched targets (``target_summary``; unfinished count as not found).
    """
    live = [r for r in records if not r["already_failing"]]
    judge_already = sum(r["clean_judge"] != r["class"] for r in live)
    kinds = [failure_kind(r["class"], r["clean_judge"], r["final_judge"]) for r in live if r["found"]]
    counts = {kind: kinds.count(kind) for kind in FAILURE_KINDS}
    judge_searched = searched - judge_already
    return {
        "already_failing_judge": judge_already,
        "searched_judge": judge_searched,
        "failures_confirmed_by_judge": counts[CONFIRMED],
        "failures_d_only": counts[D_ONLY],
        "failures_pre_existing": counts[PRE_EXISTING],
        "ssr_judge": counts[CONFIRMED] / judge_searched if judge_searched > 0 else None,
    }
