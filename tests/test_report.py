"""``sage report``: the page in headless Chromium on a real tiny-stack run, and its numbers on hand-made runs
whose answers are known (baseline ratio, killed run, chi reference), plus the progress bar and the gallery."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from helpers import REPO, error_of
from PIL import Image
from safetensors.torch import save_file
from scipy import stats

from sage_lightning.callbacks.progress import SearchProgressBar, eta_seconds, spent_forward_equivalents
from sage_lightning.report import write_report
from sage_lightning.report.baseline import compare
from sage_lightning.report.gallery import gallery_label, labelled_pairs
from sage_lightning.report.load import load_run
from sage_lightning.report.markup import TABLE_CAP
from sage_lightning.report.numbers import run_summary
from sage_lightning.report.plots import chi_reference, norm_plot_data

TINY = str(REPO / "configs" / "latent_search_tiny.yaml")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
MEMBERS = ("0:a", "1:b")


# ------------------------------------------------------------------------------- hand-made runs
def _png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def latent_record(target: int, cls: str, found: bool, already: bool = False, cost: int = 100,
                  seed: int | None = None) -> dict:
    return {
        "target": target, "class": cls, "prompt": f"a photo of a {cls}", "seed": target if seed is None else seed,
        "found": found, "already_failing": already, "iterations": 0 if already else 3,
        "unet_evaluations": cost, "forward_equivalents": cost, "loss": -0.5,
        "probs": {m: 0.01 for m in MEMBERS}, "top1": {m: "other" for m in MEMBERS},
        "ngr": {"ks_pvalue": 0.5, "norm_ratio": 1.0, "outlier": False},
        "clean_image": f"images/{target:05d}_clean.png", "image": f"images/{target:05d}_final.png",
        "latent": f"latents/{target:05d}.safetensors",
    }


def make_run(root: Path, records: list[dict], summary: dict | None = None, config: dict | None = None,
             partial_line: str = "") -> Path:
    """A run folder as the writers leave it: results.jsonl, images, latents, config.yaml (summary.json if given)."""
    root.mkdir(parents=True, exist_ok=True)
    for r in records:
        for key in ("clean_image", "image"):
            if r.get(key):
                _png(root / r[key], (40 * (r["target"] % 6), 120, 200))
        if r.get("latent"):
            (root / "latents").mkdir(exist_ok=True)
            z0 = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(r["target"]))
            save_file({"z": z0 / z0.norm() * 16, "z0": z0}, str(root / r["latent"]))
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (root / "results.jsonl").write_text(lines + partial_line)
    config = config or {"model": {"class_path": "sage_lightning.searches.LatentSearch",
                                  "init_args": {"diffusion": "tiny", "max_iterations": 3}}}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    if summary is not None:
        (root / "summary.json").write_text(json.dumps(summary))
    return root


def _runs(tmp_path: Path, sage_found: list[bool], random_found: list[bool], cost: int = 100):
    classes = ["star", "ring", "heart", "circle", "arrow", "cross"]
    a = make_run(tmp_path / "sage", [latent_record(i, classes[i], f, cost=cost) for i, f in enumerate(sage_found)])
    b = make_run(tmp_path / "random", [latent_record(i, classes[i], f, cost=cost) for i, f in enumerate(random_found)])
    return load_run(a), load_run(b)


# ------------------------------------------------------------------------------------- numbers
def test_baseline_ratio_has_the_known_answer(tmp_path):
    sage_run, random_run = _runs(tmp_path, [True, True, True, False], [True, False, False, False])
    result = compare(sage_run, random_run)
    assert result["sage_rate_per_1000"] == pytest.approx(7.5)  # 3 failures / 400 forward-equivalents * 1000
    assert result["baseline_rate_per_1000"] == pytest.approx(2.5)
    assert result["ratio"] == pytest.approx(3.0)
    assert result["paired"] and result["ci_low"] <= 3.0 <= result["ci_high"]
    assert compare(sage_run, random_run) == result  # seeded: the interval is reproducible


def test_baseline_leaves_out_already_failing_targets(tmp_path):
    sage_run, random_run = _runs(tmp_path, [True, True, True, False], [True, False, False, False])
    extra = latent_record(4, "arrow", True, already=True, cost=8)  # the clean image fails: not a find, not a cost
    more = make_run(tmp_path / "more", [*sage_run.results, extra])
    assert compare(load_run(more), random_run)["ratio"] == pytest.approx(3.0)


def test_baseline_interval_is_a_percentile_bootstrap_over_targets(tmp_path):
    sage_run, random_run = _runs(tmp_path, [True, False] * 3, [True] + [False] * 5, cost=50)
    result = compare(sage_run, random_run, draws=4000, seed=3)
    rng = np.random.default_rng(3)  # the same draws by hand: paired target ids
    ids = rng.integers(0, 6, (4000, 6))
    a, b = np.array([1.0, 0.0] * 3), np.array([1.0] + [0.0] * 5)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = a[ids].sum(1) / b[ids].sum(1)
    ratios = ratios[~np.isnan(ratios)]
    assert result["ratio"] == pytest.approx(3.0)
    assert result["ci_low"] == pytest.approx(np.percentile(ratios, 2.5, method="inverted_cdf"))
    assert result["ci_high"] == pytest.approx(np.percentile(ratios, 97.5, method="inverted_cdf"))


def test_chi_reference_is_the_law_of_gaussian_latent_norms():
    d = 64
    z = np.random.default_rng(0).standard_normal((4000, d))
    ratios = np.linalg.norm(z, axis=1) / math.sqrt(d)
    assert stats.kstest(ratios, chi_reference(d).cdf).pvalue > 0.01
    assert stats.kstest(ratios * 1.05, chi_reference(d).cdf).pvalue < 1e-6  # a 5% scale error is caught
    data = norm_plot_data([1.0], list(ratios[:50]), 16384)  # Stable Diffusion's 4x64x64 latent
    assert np.trapezoid(data["pdf"], data["x"]) == pytest.approx(1.0, abs=1e-3)
    assert chi_reference(16384).mean() == pytest.approx(1.0, abs=1e-4)
    assert chi_reference(16384).std() == pytest.approx(1 / math.sqrt(2 * 16384), rel=1e-3)


def test_killed_run_reports_its_finished_targets(tmp_path):
    config = {"model": {"class_path": "sage_lightning.searches.LatentSearch", "init_args": {"diffusion": "tiny"}},
              "data": {"init_args": {"classes": ["star", "ring", "heart"], "templates": ["a photo of a {}"],
                                     "seeds_per_class": 2}}}
    records = [latent_record(0, "star", True), latent_record(1, "star", False),
               latent_record(2, "ring", True, already=True)]
    run = make_run(tmp_path / "killed", records, config=config, partial_line='{"target": 3, "cla')
    summary = run_summary(load_run(run))
    assert summary["targets"] == 6 and summary["finished"] == 3 and summary["unfinished"] == 3
    assert summary["already_failing"] == 1 and summary["searched"] == 5 and summary["failures"] == 1
    assert summary["ssr_discriminator"] == pytest.approx(1 / 5)  # unfinished targets count as not found
    page = write_report(run).read_text()
    assert "Run unfinished" in page and "3 of 6 targets finished" in page
    assert len(re.findall(r"class='target-row'", page)) == 3


def test_analysis_sections_render_any_analysis_file(tmp_path):
    run = make_run(tmp_path / "run", [latent_record(0, "star", True)])
    (run / "analysis" / "region").mkdir(parents=True)
    _png(run / "analysis" / "region" / "plot.png", (0, 0, 0))
    rows = [{"latent": i, "radius": 0.1 * i, "p_failure": None} for i in range(TABLE_CAP + 50)]
    (run / "analysis" / "b_region.json").write_text(json.dumps({
        "title": "Failure-region size", "summary": {"median radius": 0.42, "latents": 250, "kind": None},
        "rows": rows, "images": ["analysis/region/plot.png"], "notes": "How far the failure extends <around z>.",
    }))
    (run / "analysis" / "a_broken.json").write_text("{not json")
    page = write_report(run).read_text()
    section = page[page.index("<section id='analyses'>"):]
    assert section.index("analysis-a_broken") < section.index("analysis-b_region")  # sorted by name
    assert "Failure-region size" in section and "<dd>0.42</dd>" in section and "<dd>250</dd>" in section
    assert "How far the failure extends &lt;around z&gt;." in section  # escaped, not markup
    table = section[section.index("<table class='analysis-rows'>"):]
    assert table[: table.index("</table>")].count("<tr") == TABLE_CAP + 1  # header + capped rows
    assert f"First {TABLE_CAP} of {TABLE_CAP + 50} rows" in section
    assert "src='analysis/region/plot.png'" in section and "not readable JSON" in section


def test_prompt_failure_marks_added_words_and_each_seed_decision(tmp_path):
    record = {
        "target": 0, "class": "star", "template": "a photo of a star", "seed": 0,
        "prompt": "a photo of a star on blue", "words": ["on", "blue"], "found": True, "already_failing": False,
        "iterations": 4, "unet_evaluations": 300, "forward_equivalents": 500, "rounds": [],
        "clean_image": "images/00000_w0.png", "image": "images/00000_w2.png", "eval_seeds": [7, 8, 9],
        "decisions": [True, False, True], "failed_seeds": 2, "probs": {"0:a": [0.01, 0.6, 0.02]},
        "judge": {"shapes": ["ring", "star", None], "failed": [True, False, True], "failed_seeds": 2,
                  "confirmed": True},
    }
    run = make_run(tmp_path / "prompt", [record], config={"model": {"class_path": "x.PromptSearch"}})
    # a writer's grid of 3 seeds: make_grid(nrow=3, padding=2) of 8x8 tiles, tile k coloured k
    grid = Image.new("RGB", (2 + 3 * 10, 12), "black")
    for k in range(3):
        grid.paste(Image.new("RGB", (8, 8), (50 * k + 10, 0, 0)), (2 + 10 * k, 2))
    grid.save(run / "images" / "00000_w2.png")
    page = write_report(run).read_text()
    assert "a photo of a star <mark>on blue</mark>" in page
    assert page.count("<figure class='seed'>") == 3 and page.count("D fails") == 2 and page.count("D passes") == 1
    for k in range(3):  # each seed's tile is that seed's image, cut out of the grid
        tile = Image.open(run / "report_files" / f"00000_final_s{k}.png")
        assert tile.size == (8, 8) and tile.getpixel((4, 4)) == (50 * k + 10, 0, 0)


def test_token_run_shows_hit_rates_and_clip_scores(tmp_path):
    def side(hit: bool, name: str) -> dict:
        return {"hit": hit, "d_failed": hit, "p_target": {"0:a": 0.9 if hit else 0.1}, "top1": {"0:a": "star"},
                "judge": None, "judge_hit": None, "image": name}

    records = [{"target": i, "class": c, "prompt": f"a drawing of a {c}", "seed": 1,
                "with_token": side(hit, f"images/heldout_{i:05d}_with.png"),
                "without_token": side(False, f"images/heldout_{i:05d}_without.png")}
               for i, (c, hit) in enumerate([("ring", True), ("ring", False), ("heart", True)])]
    run = make_run(tmp_path / "token", [])
    for r in records:
        for key in ("with_token", "without_token"):
            _png(run / r[key]["image"], (200, 10, 10))
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "summary.json").write_text(json.dumps({
        "target_class": "star", "held_out_prompts": 3, "hit_rate_ensemble": {"with_token": 2 / 3, "without_token": 0},
        "hit_rate_judge": None, "clip_score": {"with_token": 21.5, "without_token": 24.25}}))
    page = write_report(run).read_text()
    assert "<td>21.5</td>" in page and "<td>24.2</td>" in page  # CLIP score with / without the token
    assert "<tr class=''><td>ring</td><td>2</td><td>0.5</td><td>0</td></tr>" in page  # hit rate per held-out class
    assert len(re.findall(r"class='target-row'", page)) == 3
    summary = json.loads((run / "summary.json").read_text())
    summary["hit_rate_ensemble"] = {"with_token": None, "without_token": None}  # no held-out prompt finished
    (run / "summary.json").write_text(json.dumps(summary))
    page = write_report(run).read_text()
    assert "<td>hit rate, D&#x27;s ensemble</td><td>n/a</td><td>n/a</td>" in page


# ------------------------------------------------------------------------------------ user errors
@pytest.mark.parametrize("case", ["missing", "no_results", "file"])
def test_user_mistakes_are_one_line(tmp_path, capsys, case):
    path = tmp_path / "run"
    if case == "no_results":
        path.mkdir()
    if case == "file":
        path.write_text("x")
    err = error_of(["report", str(path)], capsys)
    assert err.startswith("sage: error:") and str(path) in err and len(err.splitlines()) == 1, err


def test_bad_baseline_and_usage_are_one_line(tmp_path, capsys):
    run = make_run(tmp_path / "run", [latent_record(0, "star", True)])
    err = error_of(["report", str(run), "--baseline", str(tmp_path / "nope")], capsys)
    assert "nope" in err and len(err.splitlines()) == 1
    err = error_of(["report"], capsys)
    assert err.startswith("sage: error:") and "RUN_DIR" in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------- progress bar and gallery
def _module(status: list[int], iterations: list[int]) -> SimpleNamespace:
    module = SimpleNamespace(
        status=torch.tensor(status), iterations=torch.tensor(iterations), max_iterations=5,
        targets=[SimpleNamespace(class_name=c, seed=s) for c, s in zip("abcd", range(4), strict=False)],
    )
    module.forward_equivalents_spent = lambda: int(((module.iterations + 1) * 8 + module.iterations * 8).sum())
    return module


def test_progress_bar_counts_targets_failures_and_cost(monkeypatch):
    from sage_lightning.sampler import FullGradient
    from sage_lightning.searches import LatentSearch

    search = LatentSearch(diffusion="tiny", num_steps=4, grad_mode=FullGradient())
    search.targets, search.iterations = [None] * 4, torch.tensor([2, 3, 5, 1])
    # the search's own count: 4 guided steps are 8 forwards an image, their backward 8 x 2 = 16
    assert spent_forward_equivalents(search) == sum((i + 1) * 8 + i * 16 for i in (2, 3, 5, 1))
    assert eta_seconds(10.0, 5, 6) == pytest.approx(12.0) and eta_seconds(0.0, 0, 3) is None
    assert SearchProgressBar().is_disabled  # pytest's stdout is not a terminal: no bar at all

    monkeypatch.setattr("sage_lightning.callbacks.progress._is_terminal", lambda: True)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    bar = SearchProgressBar()
    trainer = SimpleNamespace(is_global_zero=True)
    bar._trainer = trainer
    start = _module([0, 0, 0, 0], [0, 0, 0, 0])
    bar.on_train_start(trainer, start)
    start.status[0], start.iterations[:] = 1, torch.tensor([2, 2, 2, 2])
    bar.on_train_batch_end(trainer, start, None, None, 0)
    bar.on_train_batch_end(trainer, start, None, None, 1)  # the same failure is announced once
    text = out.getvalue()
    assert text.count("failure: target 0 (a, seed 0) at iteration 2") == 1
    assert "targets: 1/4 |" in text and "| failures 1 · " in text and "FE/s" in text and "ETA ≤" in text


def test_gallery_labels_every_failure():
    pairs = [(Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue"), f"star · seed {k} · it 3")
             for k in range(6)]
    sheet = labelled_pairs(pairs)
    assert sheet.shape[0] == 3 and sheet.shape[2] == 6 + 4 * (130 + 6)  # four pairs per row
    assert sheet.shape[1] == 6 + 2 * (64 + 16 + 6)  # two rows of pairs and labels
    label_strip = sheet[:, 6 + 64 + 2: 6 + 64 + 14, 6: 130]
    assert (label_strip < 0.5).any()  # text is drawn under the pair
    assert gallery_label(latent_record(3, "ring", True, seed=7)) == "ring · seed 7 · it 3"
    assert gallery_label({"class": "star", "seed": 0, "words": ["on", "ice"]}) == "star · seed 0 · +on ice"


# ----------------------------------------------------------------------- a real run, in a browser
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A real latent search on the tiny stack (3 targets, one iteration), through ``sage fit``."""
    from sage_lightning.cli import main

    run = tmp_path_factory.mktemp("report") / "run"
    main(["fit", "--config", TINY, "--trainer.default_root_dir", str(run), "--model.init_args.max_iterations", "1",
          "--model.init_args.num_steps", "2", "--data.init_args.classes", "[star, ring, heart]",
          "--data.init_args.seeds_per_class", "1"])
    return run


def test_sage_fit_writes_the_report(tiny_run):
    page = (tiny_run / "report.html").read_text()
    assert "LatentSearch on tiny" in page and "Run unfinished" not in page
    assert "report_files/loss.png" in page and "report_files/norms.png" in page


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=5000"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


def assert_renders_in_chromium(page: Path, targets: int, tmp: Path) -> str:
    """Chromium renders ``page``: one row per target, every image referenced exists, decodes and loads in the
    browser, and the screenshot is not blank. Returns the rendered DOM."""
    assert CHROMIUM is not None, "CI must have chromium (.ci/run installs it with apt-get)"
    dom = _chromium("--dump-dom", page.as_uri(), tmp=tmp).stdout
    assert len(re.findall(r'<tr class="target-row">', dom)) == targets  # one row per target
    sources = re.findall(r'<img src="([^"]+)"', dom)
    assert sources and re.search(rf'data-images="{len(sources)}"', dom), "the page's load check did not run"
    assert 'data-images-broken=""' in dom  # every image loaded in the browser (naturalWidth > 0)
    for src in sources:  # and every file referenced is there and decodes
        with Image.open(page.parent / src) as im:
            im.load()
    shot = tmp / "page.png"
    _chromium(f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri(), tmp=tmp)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (2000, 1200) and pixels.std() > 20  # not a blank page
    return dom


needs_chromium = pytest.mark.skipif(CHROMIUM is None and not IN_CI, reason="chromium is not installed (CI installs it)")


@needs_chromium
def test_report_renders_in_headless_chromium(tiny_run, tmp_path, capsys):
    from sage_lightning.cli import main

    baseline = make_run(tmp_path / "baseline", [
        {**latent_record(i, c, i == 0), "seed": 0, "prompt": f"a photo of a {c}"}
        for i, c in enumerate(["star", "ring", "heart"])])
    main(["report", str(tiny_run), "--baseline", str(baseline)])
    assert capsys.readouterr().out.startswith("sage report: ")
    targets = len((tiny_run / "results.jsonl").read_text().splitlines())
    assert targets == 3
    dom = assert_renders_in_chromium(tiny_run / "report.html", targets, tmp_path)
    assert "SAGE against the baseline" in dom


@pytest.mark.slow
@needs_chromium
def test_shapesworld_report_renders_in_headless_chromium(tmp_path):
    """A real ShapesWorld search (2 targets, 2 iterations; minutes on a shared CPU): its page, with the judge."""
    from sage_lightning.cli import main

    run = tmp_path / "run"
    main(["fit", "--config", str(REPO / "configs" / "latent_search.yaml"), "--trainer.default_root_dir", str(run),
          "--model.init_args.max_iterations", "2", "--data.init_args.classes", "[square, star]",
          "--data.init_args.seeds_per_class", "1"])
    dom = assert_renders_in_chromium(run / "report.html", 2, tmp_path)
    assert "LatentSearch on shapesworld" in dom and "SSR(J)" in dom and "D and judge agree" in dom
    failures = json.loads((run / "summary.json").read_text())["failures"]
    assert dom.count('class="card failure"') == failures


def test_out_elsewhere_keeps_every_image_reachable(tmp_path, capsys):
    run = make_run(tmp_path / "run", [latent_record(0, "star", True), latent_record(1, "ring", False)])
    (tmp_path / "pages").mkdir()
    page = write_report(run, out=tmp_path / "pages" / "star.html")
    sources = re.findall(r"<img src='([^']+)'", page.read_text())
    assert sources and all((page.parent / src).is_file() for src in sources)
    assert not (run / "report.html").exists()
    err = error_of(["report", str(run), "--out", str(tmp_path / "nowhere" / "x.html")], capsys)
    assert "nowhere" in err and len(err.splitlines()) == 1
