"""The neighbourhood check of a D-failure (issue 19; METHOD.md, "The neighbourhood check"): the settings, the
re-draws, the verdict on ShapesWorld's real D, its cost in the results, and resume / DDP with it on."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import REPO, kill_after_first_checkpoint, results, sage
from test_latent_search import assert_same_run

from sage_lightning.errors import SageError
from sage_lightning.searches import LatentSearch
from sage_lightning.searches.neighbourhood import NeighbourhoodCheck, check_neighbourhoods
from sage_lightning.targets import Target

TINY = str(REPO / "configs" / "latent_search_tiny.yaml")
CHECK = ["--model.init_args.failure_check", "{draws: 3, sigma: 0.1, min_failing: 2}"]


@pytest.mark.parametrize(("settings", "needle"), [
    ({"draws": 0}, "failure_check.draws=0"),
    ({"sigma": 0.0}, "failure_check.sigma=0.0"),
    ({"draws": 4, "min_failing": 5}, "failure_check.min_failing=5"),
])
def test_bad_settings_are_refused_naming_the_value(settings, needle):
    with pytest.raises(SageError, match=needle):
        NeighbourhoodCheck(**settings)


def test_neighbours_lie_on_the_shell_near_z_and_depend_on_seed_and_iteration_only():
    check = NeighbourhoodCheck(draws=5, sigma=0.1)
    z = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0))
    z = z * (math.sqrt(z.numel()) / z.norm())
    near = check.neighbours(z, seed=7, iteration=3)
    assert near.shape == (5, 4, 8, 8)
    assert torch.allclose(near.flatten(1).norm(dim=1), torch.full((5,), math.sqrt(z.numel())))
    distance = (near - z).flatten(1).norm(dim=1) / math.sqrt(z.numel())
    assert ((distance > 0.05) & (distance < 0.15)).all()  # about sigma per entry
    assert torch.equal(near, check.neighbours(z, seed=7, iteration=3))
    assert not torch.equal(near, check.neighbours(z, seed=7, iteration=4))
    assert not torch.equal(near, check.neighbours(z, seed=8, iteration=3))


def _shapesworld_search(targets: list[Target], check: NeighbourhoodCheck) -> LatentSearch:
    search = LatentSearch(diffusion="shapesworld", failure_check=check)
    search.prepare(lambda names: targets)
    return search


def test_a_single_point_failure_on_a_clean_latent_is_not_declared_and_a_wrong_drawing_is():
    """ShapesWorld's real D. Row 0: a star drawn as asked (D accepts its neighbourhood), said to have failed at z:
    the check takes the failure back. Row 1: a circle drawn where the class is star: D fails on the whole
    neighbourhood, so the failure stands. Row 2: padding (-1) is never checked. Each real checked row counts once."""
    targets = [Target(0, "star", "a photo of a star", 9_900_001), Target(1, "star", "a photo of a circle", 9_900_002)]
    search = _shapesworld_search(targets, NeighbourhoodCheck(draws=4, sigma=0.1, min_failing=3))
    ids = torch.tensor([0, 1, -1])
    z = search.initial_latents(ids.clamp(min=0))
    with torch.no_grad():
        images = search.generate(z, search.prompt_embeddings([t.prompt for t in targets] + [targets[0].prompt]),
                                 [t.seed for t in targets] + [targets[0].seed])
        output = search.frozen.ensemble(images, search.class_index[ids.clamp(min=0)])
    assert output.failed.tolist() == [False, True, False]  # the premise: D accepts the star, rejects the circle
    forced = dataclasses.replace(output, failed=torch.tensor([True, True, True]))
    checked = check_neighbourhoods(search, ids, z, forced)
    assert checked.failed.tolist() == [False, True, True]  # padding keeps its value; advance drops it
    assert search.neighbourhood_checks.tolist() == [1, 1]
    assert torch.equal(checked.probs, output.probs) and torch.equal(checked.per_sample_loss, output.per_sample_loss)


@pytest.fixture(scope="module")
def checked_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("checked") / "run"
    sage("fit", "--config", TINY, "--trainer.default_root_dir", str(run), *CHECK)
    return run


def test_the_checks_images_are_charged_in_the_results(checked_run):
    """Tiny stack (4 steps, guidance: 8 UNet calls an image): a target's cost is its iterations' plus 3 images per
    check; a found target was checked at least once (its last check passed), and some run charges a check."""
    image = 8
    extra = []
    for r in results(checked_run):
        search = (r["iterations"] + 1) * image + r["iterations"] * 4 * 2
        checks, rest = divmod(r["forward_equivalents"] - search, 3 * image)
        assert rest == 0 and checks >= int(r["found"])
        assert r["unet_evaluations"] == (r["iterations"] + 1) * image + r["iterations"] * 4 + checks * 3 * image
        extra.append(checks)
    assert sum(extra) > 0


def test_resume_after_sigkill_with_checks_equals_uninterrupted_run(checked_run, tmp_path):
    run = tmp_path / "run"
    kill_after_first_checkpoint(run, "fit", "--config", TINY, "--trainer.default_root_dir", str(run), *CHECK)
    sage("fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last")
    assert_same_run(checked_run, run)


def test_ddp_with_checks_equals_one_device(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    one = ["--data.init_args.batch_size", "1", *CHECK]
    sage("fit", "--config", TINY, "--trainer.default_root_dir", str(single), *one)
    sage("fit", "--config", TINY, "--trainer.default_root_dir", str(ddp), *one, "--trainer.devices", "2",
         "--trainer.strategy", "ddp")
    assert_same_run(single, ddp)
    assert any(r["forward_equivalents"] > (r["iterations"] + 1) * 8 + r["iterations"] * 8 for r in results(ddp))
