"""SAGE against a baseline run (``sage report RUN --baseline OTHER``): discovery rate and its ratio.

Discovery rate of a run = failures D declared / forward-equivalents spent on the searched targets, per 1,000
(METHOD.md, "The cost unit": a UNet forward = 1, a backward = 2). Targets already failing before any search are
left out (as from SSR), so are targets the run never finished. The ratio SAGE ÷ baseline says how many more
failures SAGE finds for the same compute; its 95% interval is a percentile bootstrap over targets, paired
(the same target ids drawn in both runs) when both runs searched the same targets, seeded, so it is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sage_lightning.errors import SageError
from sage_lightning.report.load import TOKEN, RunData

PER = 1000.0


@dataclass
class Discovery:
    """Failures and cost of the searched targets of one run, keyed by target."""

    keys: list[tuple]
    failures: np.ndarray  # [n] 0/1
    cost: np.ndarray  # [n] forward-equivalents (or UNet evaluations for runs that predate them)
    unit: str

    @property
    def rate(self) -> float:
        """Failures per 1,000 forward-equivalents."""
        return float(PER * self.failures.sum() / self.cost.sum()) if self.cost.sum() > 0 else float("nan")


def discovery(run: RunData) -> Discovery:
    """The searched, finished targets of ``run`` (SageError for a run that has none or records no cost)."""
    if run.kind == TOKEN:
        raise SageError(f"{str(run.root)!r} is a universal-token run: a discovery rate needs a latent or prompt "
                        "search (give such runs to --baseline and as RUN_DIR)")
    records = [r for r in run.results if not r.get("already_failing")]
    if not records:
        why = "every finished target was already failing" if run.results else "no target finished yet"
        raise SageError(f"{str(run.root)!r} has no searched target ({why}): no discovery rate; compare runs that "
                        "searched targets")
    unit = "forward_equivalents" if all("forward_equivalents" in r for r in records) else "unet_evaluations"
    if not all(unit in r for r in records):
        raise SageError(f"{str(run.root)!r} records no cost per target (forward_equivalents): rerun it with this "
                        "version of sage")
    keys = [(r.get("class"), r.get("template", r.get("prompt")), r.get("seed")) for r in records]
    return Discovery(keys, np.array([float(bool(r.get("found"))) for r in records]),
                     np.array([float(r[unit]) for r in records]), unit)


def _ratio(a_fail: np.ndarray, a_cost: np.ndarray, b_fail: np.ndarray, b_cost: np.ndarray) -> np.ndarray:
    """Rate ratios of bootstrap draws (rows); inf where the baseline found nothing, nan where neither did."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (a_fail.sum(-1) / a_cost.sum(-1)) / (b_fail.sum(-1) / b_cost.sum(-1))


def compare(sage: RunData, baseline: RunData, draws: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """SAGE's and the baseline's discovery rates, their ratio and its bootstrap interval (over targets)."""
    a, b = discovery(sage), discovery(baseline)
    rng = np.random.default_rng(seed)
    paired = sorted(a.keys) == sorted(b.keys) and len(set(a.keys)) == len(a.keys)
    if paired:  # the same targets in both runs: resample target ids, keep each target's pair together
        order = [b.keys.index(k) for k in a.keys]
        b = Discovery(a.keys, b.failures[order], b.cost[order], b.unit)
        ia = ib = rng.integers(0, len(a.keys), (draws, len(a.keys)))
    else:
        ia = rng.integers(0, len(a.keys), (draws, len(a.keys)))
        ib = rng.integers(0, len(b.keys), (draws, len(b.keys)))
    ratios = _ratio(a.failures[ia], a.cost[ia], b.failures[ib], b.cost[ib])
    ratios = ratios[~np.isnan(ratios)]
    tail = (1 - level) / 2 * 100
    # sample quantiles without interpolation: draws where the baseline found nothing are infinite
    low, high = (np.percentile(ratios, [tail, 100 - tail], method="inverted_cdf") if len(ratios)
                 else (float("nan"),) * 2)
    point = a.rate / b.rate if b.rate > 0 else (float("inf") if a.rate > 0 else float("nan"))
    return {
        "sage_run": str(sage.root), "baseline_run": str(baseline.root), "baseline_search": baseline.search,
        "unit": a.unit if a.unit == b.unit else "mixed (forward_equivalents and unet_evaluations)",
        "sage_targets": len(a.keys), "baseline_targets": len(b.keys),
        "sage_failures": int(a.failures.sum()), "baseline_failures": int(b.failures.sum()),
        "sage_rate_per_1000": a.rate, "baseline_rate_per_1000": b.rate,
        "ratio": point, "ci_low": float(low), "ci_high": float(high), "level": level,
        "draws": draws, "seed": seed, "paired": paired,
    }
