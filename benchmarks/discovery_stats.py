"""The statistics and tables of ``benchmarks/discovery.py``: SSR(A), SSR(J), D-only share, median cost per failure
and NGR per method and class with bootstrap intervals, and each method's paired difference to chance."""

from __future__ import annotations

import math
import statistics

import numpy as np

ALL = "overall"


def statistics_of(items: list[dict]) -> dict[str, float | None]:
    found = [o for o in items if o["found"]]
    nan = float("nan")
    judged = bool(items) and items[0]["confirmed"] is not None
    return {
        "ssr_a": sum(o["found"] for o in items) / len(items) if items else nan,
        "ssr_j": (sum(o["found"] and bool(o["confirmed"]) for o in items) / len(items) if items else nan)
        if judged else None,
        "d_only": (sum(o["found"] and bool(o.get("d_only")) for o in items) / len(items) if items else nan)
        if judged else None,
        "median_cost": statistics.median(o["cost"] for o in found) if found else nan,
        "ngr": sum(o["outlier"] for o in found) / len(found) if found else nan,
    }


def bootstrap(items: list[dict], resamples: int, seed: int) -> dict[str, tuple[float, float] | None]:
    """95% percentile intervals of each statistic over targets resampled with replacement."""
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(resamples if items else 0):
        sample = [items[i] for i in rng.integers(0, len(items), len(items))]
        for key, value in statistics_of(sample).items():
            if value is not None and not math.isnan(value):
                draws.setdefault(key, []).append(value)
    return {k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for k, v in draws.items()}


def summarise(results: dict[str, dict[int, dict]], resamples: int, seed: int) -> tuple[list[dict], list[int]]:
    """Table rows (method x class, then overall) over the targets no method found already failing (for D at
    z0, or for the judge on the clean image)."""
    already = sorted({t for per in results.values() for t, o in per.items() if o["already"] or o["judge_already"]})
    rows = []
    for name, per in results.items():
        eligible = {t: o for t, o in per.items() if t not in already}
        classes = sorted({o["class"] for o in eligible.values()})
        for group in [*classes, ALL]:
            items = [o for o in eligible.values() if group in (ALL, o["class"])]
            rows.append({"method": name, "class": group, "targets": len(items), **statistics_of(items),
                         "intervals": bootstrap(items, resamples, seed)})
    return rows, already


def paired_differences(
    results: dict[str, dict[int, dict]], already: list[int], baseline: str, resamples: int, seed: int
) -> list[dict]:
    """SSR(A) and SSR(J) of each method minus ``baseline``'s on the same targets, with a paired bootstrap
    interval (the same resampled targets for both): does the method find failures more often than chance?"""
    base = results[baseline]
    targets = sorted(t for t in base if t not in already)
    rng = np.random.default_rng(seed)
    picks = [rng.integers(0, len(targets), len(targets)) for _ in range(resamples if targets else 0)]
    rows = []
    for name, per in results.items():
        if name == baseline:
            continue
        row = {"method": name, "baseline": baseline, "targets": len(targets), "intervals": {}}
        for key, hit in (("ssr_a", lambda o: o["found"]), ("ssr_j", lambda o: o["found"] and bool(o["confirmed"]))):
            if key == "ssr_j" and (not targets or per[targets[0]]["confirmed"] is None):
                row[key] = None
                continue
            diff = np.array([float(hit(per[t])) - float(hit(base[t])) for t in targets])
            row[key] = float(diff.mean()) if targets else float("nan")
            means = [float(diff[i].mean()) for i in picks]
            if means:
                row["intervals"][key] = (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))
        rows.append(row)
    return rows


def difference_table(rows: list[dict]) -> str:
    def signed(row: dict, key: str) -> str:
        if row[key] is None or math.isnan(row[key]):
            return "n/a"
        low, high = row["intervals"].get(key, (float("nan"), float("nan")))
        return f"{100 * row[key]:+.0f} pp [{100 * low:+.0f}, {100 * high:+.0f}]"

    lines = ["| method | minus | targets | SSR(A) difference | SSR(J) difference |", "|---" * 5 + "|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['baseline']} | {r['targets']} | {signed(r, 'ssr_a')} | {signed(r, 'ssr_j')} |"
        )
    return "\n".join(lines)


def cell(row: dict, key: str, percent: bool) -> str:
    value = row[key]
    if value is None:
        return "n/a"
    if math.isnan(value):
        return "-"
    fmt = (lambda x: f"{100 * x:.0f}%") if percent else (lambda x: f"{x:,.0f}")
    low_high = row["intervals"].get(key)
    return fmt(value) + (f" [{fmt(low_high[0])}, {fmt(low_high[1])}]" if low_high else "")


def table(rows: list[dict]) -> str:
    lines = ["| method | class | targets | SSR(A) | SSR(J) | D-only | median fwd-eq / failure | NGR |",
             "|---" * 8 + "|"]
    for r in sorted(rows, key=lambda r: (r["class"] != ALL, r["class"])):
        lines.append(f"| {r['method']} | {r['class']} | {r['targets']} | {cell(r, 'ssr_a', True)} | "
                     f"{cell(r, 'ssr_j', True)} | {cell(r, 'd_only', True)} | {cell(r, 'median_cost', False)} | "
                     f"{cell(r, 'ngr', True)} |")
    return "\n".join(lines)
