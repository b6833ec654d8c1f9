"""What every analysis of a run folder shares: the run's records, its rebuilt search, rendering, D's decision,
Wilson intervals, progress bars and the ``analysis/<name>.json`` writer.

The search is rebuilt from the run's ``config.yaml`` (written by LightningCLI) with the same jsonargparse
machinery ``sage fit`` used, and prepared as the search prepares itself, so a found z re-rendered here under
its own prompt goes through the run's own sampler settings (scheduler, steps, guidance, eta, dtype) and its
own scheduler-noise seeds (:meth:`AnalysisRun.noise_seed`), and gives the image the search judged.
"""

from __future__ import annotations

import io
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor

from sage_lightning.errors import SageError, one_line
from sage_lightning.results import RunFolder

ANALYSIS_DIR = "analysis"
Z95 = 1.959963984540054  # two-sided 95% normal quantile


# ------------------------------------------------------------------------------------------ statistics
def wilson_interval(successes: float, trials: float, z: float = Z95) -> tuple[float | None, float | None]:
    """Wilson score interval of a binomial proportion (95% by default); ``(None, None)`` for no trials."""
    if trials <= 0:
        return None, None
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


# ------------------------------------------------------------------------------------------- progress
@contextmanager
def quiet_loading():
    """No diffusers / transformers loading bars when stderr is not a terminal (a log file stays readable)."""
    if sys.stderr.isatty():
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as hf_logging

    bars = diffusers_logging.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars[0]:
            diffusers_logging.enable_progress_bar()
        if bars[1]:
            hf_logging.enable_progress_bar()


def progress(items: Iterable, total: int | None = None, desc: str = "") -> Iterator:
    """A tqdm bar on stderr, quiet when stderr is not a terminal."""
    from tqdm.auto import tqdm

    return iter(tqdm(items, total=total, desc=desc, disable=not sys.stderr.isatty(), leave=False))


def chunks(n: int, size: int) -> list[slice]:
    """Consecutive slices of ``range(n)`` of at most ``size``."""
    return [slice(i, min(i + size, n)) for i in range(0, n, max(1, size))]


# -------------------------------------------------------------------------------------------- writing
def write_analysis(
    run: RunFolder, name: str, *, title: str, summary: dict, rows: list[dict], images: list[str], notes: str
) -> Path:
    """``RUN/analysis/<name>.json`` with the keys the report renders (title, summary, rows, images, notes)."""
    data = {"title": title, "summary": summary, "rows": rows, "images": images, "notes": " ".join(notes.split())}
    return run.root / run.save_json(f"{ANALYSIS_DIR}/{name}.json", data)


def save_figure(run: RunFolder, relpath: str, figure) -> str:
    """A matplotlib figure as PNG in the run folder (through :class:`RunFolder`); closes the figure."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return run.save_bytes(relpath, buffer.getvalue())


def exemplar_figure(groups: list[tuple[str, list[Tensor]]], per_group: int = 8):
    """A labelled grid: one row per group (its label on the left), up to ``per_group`` images ``[3, H, W]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, len(groups))
    fig, axes = plt.subplots(rows, per_group, figsize=(1.1 * per_group + 1.5, 1.2 * rows), squeeze=False)
    for r, (label, images) in enumerate(groups):
        for c in range(per_group):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(images):
                ax.imshow(images[c].permute(1, 2, 0).clamp(0, 1).numpy())
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(wspace=0.05, hspace=0.1)
    return fig


def load_image(run: RunFolder, relpath: str) -> Tensor:
    """A PNG of the run folder as float ``[3, H, W]`` in [0, 1]."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(Image.open(run.root / relpath).convert("RGB")).float() / 255


def grid_tiles(grid: Tensor, count: int, nrow: int, padding: int = 2) -> list[Tensor]:
    """The ``count`` tiles of a ``torchvision.utils.make_grid`` image (``nrow`` per row, ``padding`` px)."""
    width = (grid.shape[-1] - padding) // nrow - padding
    rows = math.ceil(count / nrow)
    height = (grid.shape[-2] - padding) // rows - padding
    tiles = []
    for k in range(count):
        top, left = padding + (k // nrow) * (height + padding), padding + (k % nrow) * (width + padding)
        tiles.append(grid[:, top : top + height, left : left + width])
    return tiles


# ----------------------------------------------------------------------------------------- the run
def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


@dataclass
class AnalysisRun:
    """A finished (or killed) run folder with what the analyses need from it.

    Args:
        root: the run folder (``--trainer.default_root_dir`` of ``sage fit``).
        device: where to rebuild the models (``auto``: CUDA when available).
        batch_size: images per generation call.
    """

    root: Path
    device: str = "auto"
    batch_size: int = 8

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.run = RunFolder(self.root)
        if not self.root.is_dir():
            raise SageError(f"run folder {str(self.root)!r} does not exist: give the folder a `sage fit` wrote")
        config = self.root / "config.yaml"
        if not config.is_file():
            raise SageError(
                f"{str(self.root)!r} has no config.yaml: give a run folder written by `sage fit` "
                "(its --trainer.default_root_dir)"
            )
        try:
            self.config = yaml.safe_load(config.read_text()) or {}
        except yaml.YAMLError as err:
            raise SageError(f"{str(config)!r} is not valid YAML ({one_line(str(err))[:120]})") from err
        if not isinstance(self.config, dict) or "model" not in self.config:
            raise SageError(f"{str(config)!r} names no model: it is not the config.yaml of a sage run")
        self.records = self.run.read_results()
        self._search = None
        self._data = None
        self._prepared = False
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"

    # ------------------------------------------------------------------------------- the records
    @property
    def search_name(self) -> str:
        return str(self.config["model"].get("class_path", "")).rpartition(".")[2]

    @property
    def diffusion_source(self) -> str:
        return str((self.config["model"].get("init_args") or {}).get("diffusion", "shapesworld"))

    @property
    def has_latents(self) -> bool:
        """The run wrote one latent per target (latent search and its random baselines)."""
        return any(r.get("latent") for r in self.records)

    def failures(self) -> list[dict]:
        """Targets with a failure found by the search (D), already-failing ones left out as in SSR."""
        return [r for r in self.records if r.get("found") and not r.get("already_failing")]

    def require_latents(self, analysis: str) -> None:
        if not self.has_latents:
            raise SageError(
                f"{analysis} re-renders found latents, and {str(self.root)!r} ({self.search_name or 'unknown search'}) "
                "holds none: run it on a latent-search run folder (LatentSearch or a random latent baseline)"
            )

    def latent(self, record: dict) -> Tensor:
        """The found z of a record, ``[C, h, w]`` float32."""
        return self.run.load_tensors(record["latent"])["z"].float()

    # ------------------------------------------------------------------------------- the models
    def _instantiate(self) -> None:
        if self._search is not None:
            return
        import lightning as L
        from jsonargparse import ArgumentParser

        from sage_lightning.searches import TargetSearch

        parser = ArgumentParser(exit_on_error=False)
        parser.add_subclass_arguments(TargetSearch, "model", required=True)
        parser.add_subclass_arguments(L.LightningDataModule, "data", required=True)
        try:
            cfg = parser.parse_object({"model": self.config["model"], "data": self.config.get("data")})
            init = parser.instantiate_classes(cfg)
        except SageError:
            raise
        except Exception as err:  # jsonargparse's validation: name the file and the first line of its reason
            raise SageError(
                f"{str(self.root / 'config.yaml')!r} does not rebuild its search ({one_line(str(err))[:160]}): "
                "was it written by another sage version?"
            ) from err
        self._search, self._data = init.model, init.data

    @property
    def search(self):
        """The run's search module, prepared (frozen models loaded, targets built) on ``device``."""
        self._instantiate()
        if not self._prepared:
            with quiet_loading():
                self._search.prepare(self._data.targets)
            self._search.to(self.device)
            self._search.frozen.to(torch.device(self.device))
            self._prepared = True
        return self._search

    @property
    def ensemble(self):
        """The run's discriminator D (loads no diffusion model unless the search is already prepared)."""
        self._instantiate()
        if self._prepared:
            return self._search.frozen.ensemble
        return self._search.ensemble.requires_grad_(False).eval().to(self.device)  # prepare() reuses it

    @property
    def class_names(self) -> list[str]:
        return self.ensemble.class_names

    def templates(self) -> list[str]:
        """The run's prompt templates (``{}`` for the class), from its datamodule."""
        self._instantiate()
        return list(getattr(self._data, "templates", None) or ["a photo of a {}"])

    def template_of(self, record: dict) -> str:
        """The template whose class prompt is the record's prompt (the first template otherwise)."""
        prompt = record.get("template") or record["prompt"]
        for template in self.templates():
            if template.format(record["class"]) == prompt:
                return template
        return self.templates()[0]

    def noise_seed(self, record: dict) -> int:
        """The seed of the scheduler noise the search used for the record's latent (its target's seed, or the
        draw's own seed for the random baselines, ``noise_seed(target, iteration)``)."""
        search = self.search
        target = int(record["target"])
        if target >= len(search.targets) or search.targets[target].seed != int(record["seed"]):
            raise SageError(
                f"target {target} of {str(self.root)!r} has seed {record['seed']} in results.jsonl but config.yaml "
                "builds other targets: the run folder's config.yaml was edited or belongs to another run"
            )
        own = getattr(search, "noise_seed", None)
        if own is not None:
            return int(own(int(record["target"]), int(record["iterations"])))
        return int(record["seed"])

    # ---------------------------------------------------------------------------------- rendering
    @torch.no_grad()
    def render(self, latents: Tensor, prompts: Sequence[str], seeds: Sequence[int]) -> Tensor:
        """Images ``[B, 3, H, W]`` (CPU, float) of ``latents`` under ``prompts`` with the run's sampler; ``seeds``
        seed each row's scheduler noise (as the search seeds it). Batched by ``batch_size``."""
        search = self.search
        out = []
        for part in chunks(len(prompts), self.batch_size):
            cond = search.prompt_embeddings(list(prompts[part]))
            z = latents[part].to(search.device, torch.float32)
            out.append(search.generate(z, cond, list(seeds[part])).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def class_index_of(self, record: dict) -> int:
        """The class index into D's classes of the record's target, as the search carried it (a name can repeat in
        D's class list, so the name never decides)."""
        self.noise_seed(record)  # checks that config.yaml builds the record's target
        return int(self.search.class_index[int(record["target"])])

    @torch.no_grad()
    def decide(self, images: Tensor, classes: Sequence[int]) -> Tensor:
        """D's decision: ``[B]`` bool, True where the image fails its class (an index into D's classes; every
        member misses it)."""
        index = torch.tensor([int(c) for c in classes], dtype=torch.long, device=self.device)
        return self.ensemble(images.to(self.device), index).failed.cpu()

    @torch.no_grad()
    def member_probs(self, images: Tensor) -> Tensor:
        """Every member's probabilities over all classes, ``[M, B, C]`` (CPU)."""
        return self.ensemble.member_probs(images.to(self.device)).cpu()

    def fails_for(self, class_index: int, prompt: str, seed: int) -> Callable[[Tensor], Tensor]:
        """``fails(z_batch) -> [B] bool``: D's decision on the images of ``z_batch`` under one target's class
        (index), prompt and noise seed (the generic decision the region estimator takes)."""

        def fails(z: Tensor) -> Tensor:
            n = z.shape[0]
            return self.decide(self.render(z, [prompt] * n, [seed] * n), [class_index] * n)

        return fails

    def judge(self):
        """ShapesWorld's geometric judge (a function of float images ``[N, 3, H, W]`` in [0, 1] -> verdicts) when
        the run's model is ShapesWorld or its search recorded that judge's verdicts; None otherwise."""
        judged = any("final_judge" in r or r.get("judge") for r in self.records)
        if self.diffusion_source != "shapesworld" and not judged:
            return None
        from sage_lightning.results import to_uint8
        from sage_lightning.worlds import find_world

        def judge(images: Tensor) -> list[str | None]:
            import numpy as np

            return find_world("shapesworld").judge(np.stack([to_uint8(im) for im in images]))

        return judge


def limited(records: list[dict], max_items: int | None) -> list[dict]:
    """The first ``max_items`` records by target id (all with None)."""
    ordered = sorted(records, key=lambda r: int(r["target"]))
    return ordered if max_items is None else ordered[:max_items]
