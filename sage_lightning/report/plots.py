"""The report's figures (matplotlib, Agg backend), written as PNG into ``RUN_DIR/report_files/``.

* loss per iteration (one epoch = one iteration of every running target) from the CSV logs, with the failures
  found so far;
* |z|/sqrt(d) of the latents against the chi distribution of N(0, I) (``scipy.stats.chi(d, scale=1/sqrt(d))``):
  the found latents of SAGE are not outliers when they sit inside it (the paper's NGR);
* the Kolmogorov-Smirnov p-values of the found latents (uniform on [0, 1] for N(0, I) draws; NGR counts those
  below alpha);
* per-seed tiles cut out of a prompt's S-seed grid, so each seed's image stands beside its decision.
Each function returns the written file's path relative to the run folder, or None when there is nothing to plot.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
from scipy import stats

from sage_lightning.report.load import RunData

FILES = "report_files"
ALPHA = 0.01  # the NGR test's level (metrics.gaussianity)
GRID_PADDING = 2  # torchvision make_grid's padding in the writers


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, run: RunData, name: str) -> str:
    plt = _pyplot()
    path = run.root / FILES / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"{FILES}/{name}"


def per_iteration(metrics: list[dict[str, float]], key: str) -> tuple[list[int], list[float]]:
    """``(iterations, mean of key)`` over the logged steps of each epoch (= iteration) that logged ``key``."""
    by_epoch: dict[int, list[float]] = defaultdict(list)
    for row in metrics:
        if key in row and "epoch" in row:
            by_epoch[int(row["epoch"])].append(row[key])
    epochs = sorted(by_epoch)
    return epochs, [float(np.mean(by_epoch[e])) for e in epochs]


def plot_loss(run: RunData) -> str | None:
    """D's loss (mean over the targets stepped) per iteration, and failures found so far (right axis)."""
    epochs, loss = per_iteration(run.metrics, "loss")
    if not epochs:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(epochs, loss, marker="o", ms=3, color="tab:blue", label="loss")
    ax.set_xlabel("iteration (epoch)")
    ax.set_ylabel("loss  mean_m (2 p_m(c) - 1)" if run.kind != "token" else "loss")
    for key, colour in (("failures", "tab:red"), ("p_target", "tab:green")):
        x, y = per_iteration(run.metrics, key)
        if x:
            twin = ax.twinx()
            if key == "failures":
                from matplotlib.ticker import MaxNLocator

                twin.step(x, y, where="post", color=colour)
                twin.yaxis.set_major_locator(MaxNLocator(integer=True))
            else:
                twin.plot(x, y, color=colour)
            twin.set_ylabel(key.replace("_", " ") + (" so far" if key == "failures" else ""), color=colour)
            break
    ax.set_title("loss per iteration (CSV logs)")
    return _save(fig, run, "loss.png")


def chi_reference(d: int) -> stats.rv_continuous:
    """The law of |z|/sqrt(d) for z ~ N(0, I_d): chi with d degrees of freedom, scaled by 1/sqrt(d)."""
    return stats.chi(d, scale=1 / math.sqrt(d))


def latent_dimension(run: RunData) -> int | None:
    """d, the number of entries of a latent z (read from the first latent file's header)."""
    from safetensors import safe_open

    for r in run.results:
        path = run.root / str(r.get("latent") or "")
        if r.get("latent") and path.is_file():
            with safe_open(str(path), "np") as f:
                return int(np.prod(f.get_slice("z").get_shape()))
    return None


def clean_norm_ratios(run: RunData, limit: int = 2000) -> list[float]:
    """|z0|/sqrt(d) of the clean latents z0 (drawn from N(0, I)), from the latent files."""
    from safetensors import safe_open

    ratios = []
    for r in run.results[:limit]:
        path = run.root / str(r.get("latent") or "")
        if r.get("latent") and path.is_file():
            with safe_open(str(path), "np") as f:
                if "z0" in f.keys():
                    z0 = f.get_tensor("z0").astype(np.float64).ravel()
                    ratios.append(float(np.linalg.norm(z0) / math.sqrt(z0.size)))
    return ratios


def norm_plot_data(found: list[float], clean: list[float], d: int) -> dict[str, np.ndarray]:
    """The x range covering the data and the chi reference's 0.1%-99.9% quantiles, and the reference's density."""
    ref = chi_reference(d)
    values = np.array(found + clean, dtype=float)
    low, high = ref.ppf(0.001), ref.ppf(0.999)
    if len(values):
        low, high = min(low, values.min()), max(high, values.max())
    pad = (high - low) * 0.05 or 1e-3
    x = np.linspace(low - pad, high + pad, 400)
    return {"x": x, "pdf": ref.pdf(x)}


def plot_norms(run: RunData) -> str | None:
    """Histogram of |z|/sqrt(d) of the found latents (and the clean z0) over the chi density of N(0, I)."""
    d = latent_dimension(run)
    found = [r["ngr"]["norm_ratio"] for r in run.results if r.get("found") and not r.get("already_failing")
             and isinstance(r.get("ngr"), dict)]
    clean = clean_norm_ratios(run)
    if d is None or not (found or clean):
        return None
    data = norm_plot_data(found, clean, d)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    bins = np.linspace(data["x"][0], data["x"][-1], 40)
    if clean:
        ax.hist(clean, bins=bins, density=True, alpha=0.45, color="tab:gray", label=f"clean z0 ({len(clean)})")
    if found:
        ax.hist(found, bins=bins, density=True, alpha=0.6, color="tab:red", label=f"found z ({len(found)})")
    ax.plot(data["x"], data["pdf"], color="black", lw=1.5, label=f"chi(d={d}) / sqrt(d): N(0, I)")
    ax.set_xlabel("|z| / sqrt(d)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    ax.set_title("latent norms against N(0, I)")
    return _save(fig, run, "norms.png")


def plot_ks(run: RunData) -> str | None:
    """Histogram of the found latents' KS p-values, with NGR's alpha; N(0, I) draws give a flat histogram."""
    pvalues = [r["ngr"]["ks_pvalue"] for r in run.results if r.get("found") and not r.get("already_failing")
               and isinstance(r.get("ngr"), dict)]
    if not pvalues:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(pvalues, bins=np.linspace(0, 1, 21), color="tab:red", alpha=0.7, label=f"found z ({len(pvalues)})")
    ax.axvline(ALPHA, color="black", ls="--", lw=1, label=f"alpha {ALPHA} (outlier below)")
    ax.set_xlabel("Kolmogorov-Smirnov p-value against N(0, 1)")
    ax.set_ylabel("latents")
    ax.legend(fontsize=8)
    ax.set_title("normality of the found latents (NGR)")
    return _save(fig, run, "ks_pvalues.png")


def seed_tiles(run: RunData, grid: str, count: int, stem: str) -> list[str | None]:
    """Cut the ``count`` per-seed images out of a writer's grid (make_grid, ``nrow = min(count, 8)``, padding 2)
    and save them as ``report_files/<stem>_sK.png``; None for each seed when the grid is missing or odd."""
    from PIL import Image

    path = run.root / grid
    if not path.is_file() or count < 1:
        return [None] * count
    image = Image.open(path).convert("RGB")
    nrow = max(1, min(count, 8))
    rows = math.ceil(count / nrow)
    width = (image.width - GRID_PADDING) // nrow - GRID_PADDING
    height = (image.height - GRID_PADDING) // rows - GRID_PADDING
    if width < 1 or height < 1:
        return [None] * count
    out = []
    for k in range(count):
        x = GRID_PADDING + (k % nrow) * (width + GRID_PADDING)
        y = GRID_PADDING + (k // nrow) * (height + GRID_PADDING)
        rel = f"{FILES}/{stem}_s{k}.png"
        (run.root / FILES).mkdir(parents=True, exist_ok=True)
        image.crop((x, y, x + width, y + height)).save(run.root / rel)
        out.append(rel)
    return out
