"""Run metrics of SAGE: non-Gaussian rate (NGR) statistics, success rates (SSR), cost per failure."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from scipy import stats


def gaussianity(z: torch.Tensor, alpha: float = 0.01) -> dict[str, float | bool]:
    """NGR check of one latent against N(0, 1): Kolmogorov-Smirnov p-value and |z| / sqrt(d).

    ``outlier`` is True when the KS test rejects normality at ``alpha`` (SAGE_METHOD.md, NGR).
    """
    flat = z.detach().double().flatten().cpu()
    p_value = float(stats.kstest(flat.numpy(), "norm").pvalue)
    return {
        "ks_pvalue": p_value,
        "norm_ratio": float(flat.norm() / math.sqrt(flat.numel())),
        "outlier": bool(p_value < alpha),
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
    """SSR(A) over all ``targets`` of a run from its finished targets' records (SAGE_METHOD.md, "What a run
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
