"""Failure-region size and probability: the numbers behind SAGE's "failures are not outliers, and not isolated
points".

For each found z, points are drawn uniformly on spheres of radius r around it, on a geometric ladder of radii;
by default only on the Gaussian shell |z'| = |z| (the (d-2)-sphere where the sphere around z meets the shell: a
great-circle step of chord length r in a uniform direction orthogonal to z), so every point is as typical of
N(0, I) as z itself and a large radius does not fail merely by being an outlier; ``shell=False`` takes the whole
sphere (``z + r u``, u uniform). D decides on each point's image (the run's sampler, prompt and noise seed)
and P(failure) per radius is estimated with a Wilson 95% interval. Radii are given relative to sqrt(d) (d: the
latent's dimension, so sqrt(d) is the typical norm of a N(0, I) latent): rho = r / sqrt(d). The *half radius*
rho50 is where P(failure) falls below 0.5 (log-linear interpolation between the last rung at or above 0.5 and the
first below it). Beside it: the class's failure probability under the N(0, I) prior, from fresh random latents
under the class prompt.

The estimator (:func:`failure_by_radius`) takes any ``fails(z_batch) -> BoolTensor``, so it is tested on a
synthetic failure set with a known radius.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sage_lightning.analysis.common import (
    AnalysisRun,
    chunks,
    limited,
    progress,
    save_figure,
    wilson_interval,
    write_analysis,
)
from sage_lightning.errors import SageError
from sage_lightning.targets import seeded_latent

NAME = "region"
DEFAULT_RHOS = (0.02, 0.04, 0.08, 0.16, 0.32, 0.64)  # r / sqrt(d): a factor-2 ladder
PRIOR_SEED_BASE = 3_000_000_000  # fresh prior draws: far from every seed a search uses
PRIOR_SEED_STRIDE = 1_000_003
SALT = 0x5A6E  # keeps the sphere directions' generator apart from the latents' seeds


@dataclass
class RadiusEstimate:
    """P(failure) on the sphere of radius ``radius`` around a centre: ``failures`` of ``samples``, Wilson 95%."""

    radius: float
    failures: int
    samples: int

    @property
    def p(self) -> float:
        return self.failures / self.samples

    @property
    def interval(self) -> tuple[float | None, float | None]:
        return wilson_interval(self.failures, self.samples)


def sphere_points(center: Tensor, radius: float, n: int, generator: torch.Generator, shell: bool = True) -> Tensor:
    """``n`` points uniform on the sphere of ``radius`` around ``center`` (``[n, *center.shape]``); with ``shell``
    only where it meets the sphere ``|z| = |center|`` (needs ``radius <= 2 |center|``)."""
    c = center.double().flatten()
    g = torch.randn((n, c.numel()), generator=generator, dtype=torch.float64)
    if not shell:
        u = g / g.norm(dim=1, keepdim=True)
        return (c + radius * u).view(n, *center.shape).to(center.dtype)
    norm = c.norm()
    if radius > 2 * norm:
        raise SageError(f"radius {radius:g} exceeds the shell's diameter {2 * float(norm):g}: use smaller --radii")
    e = c / norm
    t = g - (g @ e).unsqueeze(1) * e  # tangent directions, uniform on the unit sphere orthogonal to z
    t = t / t.norm(dim=1, keepdim=True)
    theta = 2 * math.asin(radius / (2 * float(norm)))  # chord |z' - z| = 2 |z| sin(theta / 2) = radius
    points = math.cos(theta) * c + math.sin(theta) * float(norm) * t
    return points.view(n, *center.shape).to(center.dtype)


def failure_by_radius(
    fails: Callable[[Tensor], Tensor],
    center: Tensor,
    radii: Sequence[float],
    samples: int,
    generator: torch.Generator,
    batch_size: int = 16,
    shell: bool = True,
) -> list[RadiusEstimate]:
    """P(failure) on spheres of each radius around ``center``: ``samples`` points per radius (on the shell
    ``|z| = |center|`` with ``shell``), judged in batches of ``batch_size`` by ``fails(z_batch) -> [B] bool``."""
    if samples < 1:
        raise SageError(f"samples per radius={samples} must be at least 1")
    estimates = []
    for radius in radii:
        points = sphere_points(center, float(radius), samples, generator, shell)
        failed = sum(int(fails(points[part]).sum()) for part in chunks(samples, batch_size))
        estimates.append(RadiusEstimate(float(radius), failed, samples))
    return estimates


def half_radius(estimates: Sequence[RadiusEstimate], level: float = 0.5) -> tuple[float | None, str]:
    """Where P(failure) falls below ``level`` along the ladder: ``(radius, how)``.

    ``how``: ``interpolated`` (log-linear between the last rung >= level and the first below), ``below ladder``
    (already below at the smallest radius; radius None) or ``above ladder`` (never below; radius None).
    """
    for k, est in enumerate(estimates):
        if est.p < level:
            if k == 0:
                return None, "below ladder"
            prev = estimates[k - 1]
            t = (prev.p - level) / (prev.p - est.p)
            return math.exp(math.log(prev.radius) + t * (math.log(est.radius) - math.log(prev.radius))), "interpolated"
    return None, "above ladder"


def median_half_radius(rows: Sequence[dict], lowest: float, highest: float) -> float | str | None:
    """The median of every latent's half radius (rows of :func:`analyze`), the censored ones included: a latent below
    the ladder (P(failure) < 0.5 already at ``lowest``) counts as smaller than every rung, one above it as larger
    than ``highest``. Two middle values (even count) are averaged; where the median falls among censored latents,
    the bound is reported (``"< 0.02"``), never the median of the others alone. None without latents."""
    keys = sorted(-math.inf if r["half_radius_is"] == "below ladder" else
                  math.inf if r["half_radius_is"] == "above ladder" else float(r["half_radius"]) for r in rows)
    if not keys:
        return None
    lower, upper = keys[(len(keys) - 1) // 2], keys[len(keys) // 2]
    if math.isfinite(lower) and math.isfinite(upper):
        return (lower + upper) / 2
    if lower == -math.inf and upper == math.inf:
        return f"undetermined: as many latents below the ladder (< {lowest:g}) as above it (> {highest:g})"
    if lower == -math.inf:
        return f"< {lowest:g}" if upper == -math.inf else f"< {(lowest + upper) / 2:.3g}"
    return f"> {highest:g}" if lower == math.inf else f"> {(lower + highest) / 2:.3g}"


def interval_by_latent(estimates: Sequence[RadiusEstimate]) -> tuple[float | None, float | None]:
    """95% interval of P(failure) pooled over latents (one estimate per latent, all at one radius), with the latent
    as the unit: the points around one latent are not independent draws of the pooled rate. The variance of the mean
    of the latents' shares over latents gives an effective number of trials (Korn and Graubard), at most the points
    drawn, for a Wilson interval at the pooled share; a single latent gives its own binomial interval."""
    total = sum(e.samples for e in estimates)
    if not total:
        return None, None
    if len(estimates) < 2:
        return wilson_interval(sum(e.failures for e in estimates), total)
    shares = [e.p for e in estimates]
    p = sum(shares) / len(shares)
    variance = sum((x - p) ** 2 for x in shares) / (len(shares) - 1) / len(shares)
    trials = total if variance == 0 else min(total, p * (1 - p) / variance)
    return wilson_interval(p * trials, trials)


def prior_seeds(seed: int, draws: int) -> list[int]:
    """Seeds of the fresh N(0, I) draws (latent and scheduler noise), a function of the analysis seed only."""
    return [PRIOR_SEED_BASE + seed * PRIOR_SEED_STRIDE + k for k in range(draws)]


def prior_failure(
    run: AnalysisRun, class_index: int, prompt: str, seeds: list[int], shape: tuple[int, ...]
) -> tuple[int, int]:
    """(failures, draws) of D on fresh N(0, I) latents under ``prompt``, for the class of index ``class_index``."""
    failed = 0
    for part in chunks(len(seeds), run.batch_size):
        z = torch.stack([seeded_latent(s, shape) for s in seeds[part]])
        images = run.render(z, [prompt] * len(z), seeds[part])
        failed += int(run.decide(images, [class_index] * len(z)).sum())
    return failed, len(seeds)


def analyze(
    run: AnalysisRun,
    max_latents: int | None = None,
    rhos: Sequence[float] = DEFAULT_RHOS,
    samples: int = 16,
    prior_draws: int = 32,
    seed: int = 0,
    shell: bool = True,
) -> dict:
    """Write ``analysis/region.json`` and ``analysis/region/p_fail.png`` (see the module docstring)."""
    run.require_latents("region")
    rhos = sorted(float(r) for r in rhos)
    if not rhos or rhos[0] <= 0:
        raise SageError(f"radii {rhos} must be positive fractions of sqrt(d), e.g. --radii 0.02,0.04,0.08")
    found = limited(run.failures(), max_latents)
    rows, curves = [], []
    for record in progress(found, total=len(found), desc="region"):
        z = run.latent(record)
        root_d = math.sqrt(z.numel())
        generator = torch.Generator().manual_seed((seed * PRIOR_SEED_STRIDE + int(record["target"])) ^ SALT)
        fails = run.fails_for(run.class_index_of(record), record["prompt"], run.noise_seed(record))
        estimates = failure_by_radius(fails, z, [rho * root_d for rho in rhos], samples, generator, run.batch_size,
                                      shell)
        r50, how = half_radius(estimates)
        z0 = run.run.load_tensors(record["latent"]).get("z0")
        row = {
            "target": record["target"], "class": record["class"],
            "distance_from_z0": float((z - z0.float()).norm() / root_d) if z0 is not None else None,
            "half_radius": r50 / root_d if r50 is not None else None, "half_radius_is": how,
        }
        row.update({f"p_fail@{rho:g}": est.p for rho, est in zip(rhos, estimates, strict=True)})
        rows.append(row)
        curves.append(estimates)
    priors = {}
    if prior_draws > 0 and found:
        shape = tuple(run.latent(found[0]).shape)
        seeds = prior_seeds(seed, prior_draws)
        classes = sorted({run.class_index_of(r) for r in found})
        for index in progress(classes, total=len(classes), desc="prior draws"):
            record = next(r for r in found if run.class_index_of(r) == index)
            priors[index] = prior_failure(run, index, record["prompt"], seeds, shape)
    for row, record in zip(rows, found, strict=True):
        k, n = priors.get(run.class_index_of(record), (0, 0))
        row["prior_p_fail"] = k / n if n else None
    summary: dict = {
        "search": run.search_name, "latents": len(rows), "samples_per_radius": samples, "prior_draws": prior_draws,
        "seed": seed, "radii": ",".join(f"{r:g}" for r in rhos), "on_shell": shell,
    }
    summary["median_half_radius"] = median_half_radius(rows, rhos[0], rhos[-1])
    summary["half_radius_below_ladder"] = sum(r["half_radius_is"] == "below ladder" for r in rows)
    summary["half_radius_above_ladder"] = sum(r["half_radius_is"] == "above ladder" for r in rows)
    for k, rho in enumerate(rhos):
        at_rho = [c[k] for c in curves]
        low, high = interval_by_latent(at_rho)
        summary[f"pooled_p_fail@{rho:g}"] = sum(e.p for e in at_rho) / len(at_rho) if at_rho else None
        summary[f"pooled_ci95@{rho:g}"] = f"[{low:.2f}, {high:.2f}]" if at_rho else None
    hits, total = sum(k for k, _ in priors.values()), sum(n for _, n in priors.values())
    low, high = wilson_interval(hits, total)
    summary["prior_p_fail"] = hits / total if total else None
    summary["prior_ci95"] = f"[{low:.2f}, {high:.2f}]" if total else None
    images = [save_figure(run.run, f"analysis/{NAME}/p_fail.png", _figure(rhos, curves, summary["prior_p_fail"]))] \
        if curves else []
    shell_note = ("only where that sphere meets the Gaussian shell |z'| = |z|, so every point is as typical of "
                  "N(0, I) as z" if shell else "the whole sphere, not re-projected: |z'|/sqrt(d) is about "
                  "sqrt(1 + rho^2), and large rho are outliers that may fail for that reason alone")
    write_analysis(
        run.run, NAME, title="Failure-region size and probability", summary=summary, rows=rows, images=images,
        notes=f"""Around each found z, {samples} points per radius are drawn uniformly on the sphere of radius
        r = rho * sqrt(d) (d = latent dimension; sqrt(d) is the norm of a typical N(0, I) latent, so rho = 0.1
        is a step a tenth as long as the latent itself); {shell_note}. p_fail@rho is the share whose image D
        declares a failure (run's sampler, prompt and noise seed); pooled values are the mean over latents, with
        95% intervals that take the latent as the unit (points around one latent are not independent draws).
        half_radius: the rho where P(failure) falls
        below 0.5 (log-linear interpolation), 'below ladder' if it is already below at the smallest rho;
        median_half_radius counts those as below every rung and the 'above ladder' ones as above, and reports a
        bound where the median falls among them.
        distance_from_z0: how far the search moved from its seed, in the same unit. prior_p_fail: D's failure
        rate on {prior_draws} fresh N(0, I) latents under the class prompt (the chance of meeting a failure by
        sampling). A region with P(failure) near 1 well beyond the search's step is not an isolated point.""",
    )
    return summary


def _figure(rhos: list[float], curves: list[list[RadiusEstimate]], prior: float | None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for estimates in curves:
        ax.plot(rhos, [e.p for e in estimates], color="tab:blue", alpha=0.25, lw=1)
    at_rho = [[c[k] for c in curves] for k in range(len(rhos))]
    pooled = [sum(e.p for e in estimates) / len(estimates) for estimates in at_rho]
    low, high = zip(*(interval_by_latent(estimates) for estimates in at_rho), strict=True)
    ax.fill_between(rhos, low, high, color="tab:blue", alpha=0.2, label="pooled, 95% by latent")
    ax.plot(rhos, pooled, color="tab:blue", lw=2, marker="o", label="pooled over latents")
    if prior is not None:
        ax.axhline(prior, color="tab:red", ls="--", label="N(0, I) prior, same classes")
    ax.axhline(0.5, color="gray", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xticks(rhos, labels=[f"{r:g}" for r in rhos])
    ax.minorticks_off()
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("radius r / sqrt(d)")
    ax.set_ylabel("P(failure) on the sphere")
    ax.legend(fontsize=7, loc="lower left")
    return fig
