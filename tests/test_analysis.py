"""The paper's analyses (issue 12 part 2): pure estimators on planted or synthetic data with known answers, and
`sage analyze` end to end on a tiny-stack run (a found z re-rendered under its own prompt reproduces D's verdict)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, error_of
from torchvision.utils import make_grid

from sage_lightning.analysis import failure_kind, prompt_independence, region
from sage_lightning.analysis.common import AnalysisRun, grid_tiles, load_image, wilson_interval
from sage_lightning.analysis.failure_types import choose_k, prompt_roles, word_role
from sage_lightning.errors import SageError
from sage_lightning.results import RunFolder

TINY = str(REPO / "configs" / "latent_search_tiny.yaml")


# ------------------------------------------------------------------------------------------- statistics
def test_wilson_interval_matches_known_values():
    low, high = wilson_interval(8, 10)  # scipy.stats.binomtest(8, 10).proportion_ci(method="wilson")
    assert low == pytest.approx(0.4901624715366418, abs=1e-12) and high == pytest.approx(0.9433178485456248, abs=1e-12)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753279986288926))
    assert wilson_interval(0, 0) == (None, None)


# ------------------------------------------------------------------------------------------------ region
@pytest.mark.parametrize("shell", [True, False])
def test_sphere_points_lie_on_the_sphere_in_all_directions(shell):
    center = torch.randn(4, 8, 8)
    points = region.sphere_points(center, 3.0, 64, torch.Generator().manual_seed(0), shell=shell)
    offsets = (points - center).flatten(1)
    assert torch.allclose(offsets.norm(dim=1), torch.full((64,), 3.0), atol=1e-4)
    assert offsets.mean(0).norm() < 1.0  # directions spread (a fixed direction would give a mean of norm 3)
    norms = points.flatten(1).norm(dim=1)
    on_shell = torch.allclose(norms, torch.full((64,), float(center.norm())), atol=1e-4)
    assert on_shell == shell


def test_region_estimator_recovers_the_radius_of_a_planted_failure_ball():
    z_star = torch.randn(4, 8, 8)
    root_d = math.sqrt(z_star.numel())
    ball = 0.3 * root_d  # failures: the ball of radius 0.3 sqrt(d) around z*

    def fails(z: torch.Tensor) -> torch.Tensor:
        return (z - z_star).flatten(1).norm(dim=1) < ball

    rhos = [0.05, 0.1, 0.2, 0.4, 0.8]
    generator = torch.Generator().manual_seed(1)
    estimates = region.failure_by_radius(fails, z_star, [r * root_d for r in rhos], 12, generator, batch_size=5)
    assert [e.p for e in estimates] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert all(e.samples == 12 for e in estimates)
    r50, how = region.half_radius(estimates)
    assert how == "interpolated"
    assert 0.2 * root_d < r50 < 0.4 * root_d
    assert abs(math.log(r50 / ball)) < math.log(2) / 2  # within half a ladder step of the true radius
    low, high = estimates[3].interval
    assert (low, high) == pytest.approx(wilson_interval(0, 12))


def test_half_radius_interpolates_and_names_the_ladder_ends():
    est = [region.RadiusEstimate(r, k, 4) for r, k in [(1, 4), (2, 3), (4, 1), (8, 0)]]
    r50, how = region.half_radius(est)  # 0.75 at 2, 0.25 at 4: halfway in log r
    assert how == "interpolated" and r50 == pytest.approx(math.sqrt(8))
    assert region.half_radius([region.RadiusEstimate(1, 1, 4)]) == (None, "below ladder")
    never_below = [region.RadiusEstimate(1, 4, 4), region.RadiusEstimate(2, 2, 4)]
    assert region.half_radius(never_below) == (None, "above ladder")


def test_median_half_radius_counts_the_latents_off_the_ladder():
    """Issue 21 item 12: latents below the ladder (the smallest regions) and above it stay in the median, which is
    the mean of the two middle values for an even count, and a bound where it falls among censored latents."""
    def rows(*values):
        how = {"below": "below ladder", "above": "above ladder"}
        return [{"half_radius": None if v in how else v, "half_radius_is": how.get(v, "interpolated")} for v in values]

    assert region.median_half_radius(rows("below", 0.1, 0.2, 0.3), 0.05, 0.8) == pytest.approx(0.15)
    assert region.median_half_radius(rows(0.1, 0.2), 0.05, 0.8) == pytest.approx(0.15)  # not the upper one
    assert region.median_half_radius(rows("below", "below", 0.3), 0.05, 0.8) == "< 0.05"
    assert region.median_half_radius(rows("below", 0.25), 0.05, 0.8) == "< 0.15"
    assert region.median_half_radius(rows(0.4, "above", "above"), 0.05, 0.8) == "> 0.8"
    assert region.median_half_radius(rows("below", "above"), 0.05, 0.8).startswith("undetermined")
    assert region.median_half_radius([], 0.05, 0.8) is None


def test_pooled_interval_takes_the_latent_as_the_unit():
    """Points around one latent are not independent draws of the pooled P(failure): two latents that disagree
    (8 of 8 and 0 of 8) leave it nearly unknown, far wider than a Wilson interval over 16 independent points."""
    split = [region.RadiusEstimate(0.1, 8, 8), region.RadiusEstimate(0.1, 0, 8)]
    low, high = region.interval_by_latent(split)
    naive_low, naive_high = wilson_interval(8, 16)
    assert low < 0.5 < high and high - low > 0.8 > naive_high - naive_low
    agree = [region.RadiusEstimate(0.1, 4, 8), region.RadiusEstimate(0.1, 4, 8)]
    assert region.interval_by_latent(agree) == pytest.approx(wilson_interval(8, 16))  # no spread between latents
    assert region.interval_by_latent(split[:1]) == wilson_interval(8, 8)


# ---------------------------------------------------------------------------------- prompt-independence
CLASSES = ["star", "ring", "heart", "cross"]
PLANTED, FRAGILE, ORDINARY = 0.0, 2.0, 1.0  # latent values: fails everywhere / under styles only / nowhere


class ControlledRun(AnalysisRun):
    """A run folder whose renderer and D are controlled: the image of z under a prompt is black for the planted
    latent (zeros), black under style prompts for the fragile one, else a grey that encodes the prompt's class;
    D fails on black or on a grey of another class."""

    @property
    def class_names(self) -> list[str]:
        return CLASSES

    def noise_seed(self, record: dict) -> int:
        return int(record["seed"])

    def class_index_of(self, record: dict) -> int:
        return CLASSES.index(record["class"])

    def template_of(self, record: dict) -> str:
        return "a photo of a {}"

    def render(self, latents, prompts, seeds):
        out = []
        for z, prompt in zip(latents, prompts, strict=True):
            value = float(z.flatten()[0])
            style = not prompt.startswith("a photo")
            drawn = next(i for i, c in enumerate(CLASSES) if prompt.endswith(c))
            black = value == PLANTED or (value == FRAGILE and style)
            out.append(torch.full((3, 8, 8), 0.0 if black else (drawn + 1) / 10))
        return torch.stack(out)

    def decide(self, images, classes):
        drawn = (images[:, 0, 0, 0] * 10).round().long() - 1
        wanted = torch.tensor(list(classes))
        return (images.flatten(1).amax(1) == 0) | (drawn != wanted)


def _fake_latent_run(root: Path, values: list[float]) -> RunFolder:
    run = RunFolder(root)
    shutil.copy(TINY, root / "config.yaml")
    records = []
    for target, value in enumerate(values):
        z = torch.full((4, 8, 8), value)
        records.append({
            "target": target, "class": CLASSES[target % len(CLASSES)], "prompt": f"a photo of a {CLASSES[target % 4]}",
            "seed": target, "found": True, "already_failing": False, "iterations": 2,
            "latent": run.save_tensors(f"latents/{target:05d}.safetensors", {"z": z, "z0": z.clone()}),
        })
    run.append_results(records)
    return run


def test_a_planted_latent_that_fails_under_every_prompt_is_prompt_independent(tmp_path):
    _fake_latent_run(tmp_path, [PLANTED, FRAGILE, ORDINARY])
    summary = prompt_independence.analyze(ControlledRun(tmp_path, device="cpu"))
    written = json.loads((tmp_path / "analysis" / "prompt_independence.json").read_text())
    rows = {r["target"]: r for r in written["rows"]}
    # 3 other classes + 3 style variants per latent; the own prompt is the reproduction check
    assert [rows[t]["prompts"] for t in range(3)] == [6, 6, 6]
    assert rows[0]["share"] == 1.0 and rows[0]["prompt_independent"] and rows[0]["reproduced"]
    assert rows[1]["share"] == 0.5 and rows[1]["share_styles"] == 1.0 and rows[1]["share_other_classes"] == 0.0
    assert not rows[1]["prompt_independent"]
    assert rows[2]["share"] == 0.0 and not rows[2]["reproduced"]
    assert summary["prompt_independent"] == 1 and summary["share_prompt_independent"] == pytest.approx(1 / 3)
    assert written["images"] == ["analysis/prompt_independence/exemplars.png"]
    assert (tmp_path / written["images"][0]).is_file()


# ------------------------------------------------------------------------------------------- failure kind
def test_failure_kind_from_hand_made_judge_verdicts_split_per_class():
    verdicts = [("star", None), ("star", "triangle"), ("star", "triangle"), ("star", "star"), ("ring", None),
                ("ring", "heart")]
    items = [failure_kind.FailureItem(i, c, *failure_kind.kind_from_judge(v, c)) for i, (c, v) in enumerate(verdicts)]
    assert [(i.kind, i.drawn) for i in items[:4]] == [
        ("distorted", None), ("unrelated", "triangle"), ("unrelated", "triangle"), ("class drawn", None)]
    rows = {r["class"]: r for r in failure_kind.per_class_rows(items)}
    assert rows["star"] == {
        "class": "star", "failures": 4, "distorted": 1, "unrelated": 2, "class drawn": 1, "share_distorted": 0.25,
        "share_unrelated": 0.5, "drawn_instead": "triangle x2"}
    assert (rows["ring"]["distorted"], rows["ring"]["unrelated"], rows["ring"]["drawn_instead"]) == (1, 1, "heart x1")


def test_ensemble_proxy_needs_confident_agreement_on_another_class():
    names = ["star", "ring", "heart"]
    agree = torch.tensor([[0.1, 0.8, 0.1], [0.2, 0.7, 0.1]])
    assert failure_kind.kind_from_probs(agree, "star", names) == ("unrelated", "ring")
    assert failure_kind.kind_from_probs(agree, "star", names, confidence=0.9) == ("distorted", None)
    split = torch.tensor([[0.1, 0.8, 0.1], [0.2, 0.1, 0.7]])
    assert failure_kind.kind_from_probs(split, "star", names) == ("distorted", None)


def test_grid_tiles_cut_a_prompt_grid_back_into_its_seed_images():
    images = [torch.rand(3, 16, 16) for _ in range(5)]
    tiles = grid_tiles(make_grid(images, nrow=4, padding=2), 5, nrow=4)
    assert all(torch.equal(a, b) for a, b in zip(images, tiles, strict=True))


def test_prompt_run_failures_are_the_failing_seeds_of_the_final_grid(tmp_path):
    from sage_lightning.analysis import failure_types

    shutil.copy(REPO / "configs" / "prompt_search_tiny.yaml", tmp_path / "config.yaml")
    folder = RunFolder(tmp_path)
    seeds = [torch.rand(3, 64, 64) for _ in range(4)]
    folder.save_image("images/00000_w1.png", make_grid(seeds, nrow=4, padding=2))
    folder.append_results([{
        "target": 0, "class": "star", "prompt": "a photo of a star red", "words": ["red"], "found": True,
        "already_failing": False, "image": "images/00000_w1.png", "decisions": [True, False, True, True],
        "judge": {"shapes": [None, "star", "ring", "star"]},
    }])
    run = AnalysisRun(tmp_path, device="cpu")
    summary = failure_kind.analyze(run)  # seed 1 passed D: three failure images, judged per seed
    assert (summary["images"], summary["distorted"], summary["unrelated"], summary["class drawn"]) == (3, 1, 1, 1)
    types = failure_types.analyze(run)
    assert types["images"] == 3 and types["prompts_with_colour_words"] == 1 and types["prompts_with_size_words"] == 0
    rows = json.loads((tmp_path / "analysis" / "failure_types.json").read_text())["rows"]
    assert {r["group"] for r in rows if r["grouping"] == "added-word role"} == {"colour"}


# ------------------------------------------------------------------------------------------ failure types
def test_k_by_silhouette_recovers_three_well_separated_blobs():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 6)) * 10
    points = np.concatenate([c + rng.normal(size=(15, 6)) * 0.3 for c in centres])
    k, labels, scores = choose_k(points, max_k=6, seed=0)
    assert k == 3 and max(scores, key=scores.get) == 3
    truth = np.repeat(np.arange(3), 15)
    assert len({(a, b) for a, b in zip(truth, labels, strict=True)}) == 3  # each blob is one cluster
    assert choose_k(points[:2])[0] == 1


def test_added_words_get_their_roles():
    assert word_role("Red,") == "colour" and word_role("tiny") == "size" and word_role("sketch") == "style"
    assert prompt_roles(["red", "on", "sky"]) == {"colour", "other", "background"}
    assert prompt_roles([]) == {"other"}


# ---------------------------------------------------------------------------------- end to end, tiny stack
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A real tiny-stack latent search (one seed per class, one iteration), run through `sage fit`, with DDIM
    eta = 1, so every step draws noise from the target's generator and a re-render must seed it the same way."""
    from sage_lightning.cli import main

    run = tmp_path_factory.mktemp("analysis") / "run"
    main(["fit", "--config", TINY, "--trainer.default_root_dir", str(run), "--model.init_args.max_iterations", "1",
          "--data.init_args.seeds_per_class", "1", "--data.init_args.batch_size", "3",
          "--model.init_args.eta", "1.0", "--trainer.enable_progress_bar", "false"])
    return run


def test_a_found_latent_re_rendered_under_its_own_prompt_reproduces_d_verdict(tiny_run):
    run = AnalysisRun(tiny_run, device="cpu")
    records = run.records
    z = torch.stack([run.latent(r) for r in records])
    images = run.render(z, [r["prompt"] for r in records], [run.noise_seed(r) for r in records])
    decided = run.decide(images, [run.class_index_of(r) for r in records])
    assert decided.tolist() == [r["found"] for r in records]
    assert {r["found"] for r in records} == {True, False}  # the check sees both verdicts
    saved = torch.stack([load_image(run.run, r["image"]) for r in records])
    assert (images - saved).abs().max() <= 0.5 / 255 + 1e-6  # the very image the search judged, rounded as saved
    other_noise = run.render(z[:1], [records[0]["prompt"]], [run.noise_seed(records[0]) + 1])
    assert (other_noise - saved[:1]).abs().max() > 0.05  # the noise seed matters: the match above is no accident


def test_sage_analyze_writes_every_analysis(tiny_run, tmp_path, capsys):
    from sage_lightning.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    folder = RunFolder(run)
    records = folder.read_results()
    for r in records:  # the tiny search finds few failures in one iteration: count its failing clean seeds as found
        r["already_failing"] = False
    folder.results_path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    found = sum(r["found"] for r in records)
    main(["analyze", str(run), "--samples-per-radius", "2", "--prior-draws", "2", "--radii", "0.1,0.4",
          "--device", "cpu"])
    assert "Written:" in capsys.readouterr().out
    for name in ("prompt_independence", "failure_kind", "region", "failure_types"):
        data = json.loads((run / "analysis" / f"{name}.json").read_text())
        assert set(data) == {"title", "summary", "rows", "images", "notes"}
        assert all((run / image).is_file() for image in data["images"])
        assert all(isinstance(v, (int, float, str, type(None))) for v in data["summary"].values())
    pi = json.loads((run / "analysis" / "prompt_independence.json").read_text())
    assert pi["summary"]["latents"] == found and pi["summary"]["reproduced_under_own_prompt"] == found
    assert all(r["prompts"] == 9 + 3 for r in pi["rows"])  # the 9 other ShapesWorld classes + 3 styles
    reg = json.loads((run / "analysis" / "region.json").read_text())
    assert len(reg["rows"]) == found and all(0 <= r["p_fail@0.1"] <= 1 for r in reg["rows"])
    kind = json.loads((run / "analysis" / "failure_kind.json").read_text())
    assert kind["summary"]["decided_by"] == "ensemble proxy"
    assert sum(r["failures"] for r in kind["rows"]) == found


def test_random_baseline_latents_re_render_with_their_own_draw_noise_seed(tmp_path):
    from sage_lightning.searches.random_latent import DRAW_SEED_STRIDE

    (tmp_path / "config.yaml").write_text(
        "model:\n  class_path: sage_lightning.searches.RandomLatentSearch\n  init_args: {diffusion: tiny}\n"
        "data:\n  class_path: sage_lightning.datamodules.ClassPromptDataModule\n  init_args: {classes: [star]}\n")
    run = AnalysisRun(tmp_path, device="cpu")
    assert run.noise_seed({"target": 0, "seed": 0, "iterations": 3}) == 3 * DRAW_SEED_STRIDE  # draw 3's own
    assert run.noise_seed({"target": 0, "seed": 0, "iterations": 0}) == 0  # draw 0 is the target's z0
    with pytest.raises(SageError, match="config.yaml builds other targets"):
        run.noise_seed({"target": 0, "seed": 5, "iterations": 0})


def test_analyze_mistakes_are_one_line(tmp_path, capsys):
    err = error_of(["analyze"], capsys)
    assert err.startswith("sage: error:") and "run_dir" in err and len(err.splitlines()) == 1
    err = error_of(["analyze", str(tmp_path / "nope")], capsys)
    assert err.startswith("sage: error:") and "does not exist" in err and len(err.splitlines()) == 1
    _fake_latent_run(tmp_path, [PLANTED])
    err = error_of(["analyze", str(tmp_path), "--what", "regoin"], capsys)
    assert "'regoin'" in err and "did you mean 'region'" in err
    err = error_of(["analyze", str(tmp_path), "--samples-per-radius", "0"], capsys)
    assert "--samples-per-radius 0" in err
    err = error_of(["analyze", str(tmp_path), "--device", "gpu"], capsys)
    assert "--device 'gpu'" in err and "cuda" in err
    prompt_run = tmp_path / "prompt"
    prompt_run.mkdir()
    (prompt_run / "config.yaml").write_text("model:\n  class_path: sage_lightning.searches.PromptSearch\n")
    RunFolder(prompt_run).append_results([{"target": 0, "class": "star", "prompt": "a photo of a star red",
                                           "found": True, "already_failing": False, "words": ["red"]}])
    err = error_of(["analyze", str(prompt_run), "--what", "region"], capsys)
    assert "PromptSearch" in err and "latent-search run folder" in err and len(err.splitlines()) == 1
