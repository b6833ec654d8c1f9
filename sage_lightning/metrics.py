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


def success_rate(found: Sequence[bool]) -> float:
    """SSR: share of targets with a failure found (by D, or by the judge for SSR(J))."""
    return float(sum(bool(f) for f in found) / len(found)) if found else 0.0


def non_gaussian_rate(outliers: Sequence[bool]) -> float:
    """NGR: share of found latents that fail the normality test."""
    return float(sum(bool(o) for o in outliers) / len(outliers)) if outliers else 0.0
