"""The local random baseline (issue 14) and the forward-equivalent budget both random baselines share.

End to end on the tiny stack through ``sage fit --config latent_search_tiny.yaml --config
random_perturbation.yaml``: every target finishes, an exhausted target spends exactly its budget, the
draws obey the latent search's constraints, resume after SIGKILL and DDP on 2 processes equal one run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import REPO, kill_after_first_checkpoint, results, sage
from safetensors.torch import load_file

from sage_lightning.datamodules import ClassPromptDataModule
from sage_lightning.sampler import FullGradient, ResidualGradient
from sage_lightning.searches import LatentSearch, RandomLatentSearch, RandomPerturbationSearch

TINY = str(REPO / "configs" / "latent_search_tiny.yaml")
PERTURB = str(REPO / "configs" / "random_perturbation.yaml")
FRESH = str(REPO / "configs" / "random_latent.yaml")
SAGE_ITERATIONS = 8  # tiny: 4 guided steps (8 forwards a call), residual graph over the last 2 steps
DRAWS = 16  # (8 + 1) * 8 + 8 * (2 * 2 * 2) = 136 forward-equivalents = 17 calls of 8: z0 and 16 draws
ONE_DEVICE = ["--data.init_args.batch_size", "1"]


def _args(run: Path, *extra: str, config: str = PERTURB) -> list[str]:
    return [
        "fit", "--config", TINY, "--config", config, "--trainer.default_root_dir", str(run),
        "--model.init_args.match_sage_iterations", str(SAGE_ITERATIONS), *extra,
    ]


def _latents(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p) for p in sorted((run / "latents").glob("*.safetensors"))}


def _assert_same_run(a: Path, b: Path) -> None:
    assert [r["target"] for r in results(a)] == [r["target"] for r in results(b)]
    for ra, rb in zip(results(a), results(b), strict=True):
        assert {k: v for k, v in ra.items() if k not in ("probs", "loss")} == {
            k: v for k, v in rb.items() if k not in ("probs", "loss")
        }
    la, lb = _latents(a), _latents(b)
    assert la.keys() == lb.keys() and all(torch.equal(la[k]["z"], lb[k]["z"]) for k in la)


# ------------------------------------------------------------------------------------ the budget
def test_forward_equivalents_count_a_backward_as_two_forwards_and_a_recompute_as_one():
    kwargs = {"diffusion": "tiny", "num_steps": 4, "guidance_scale": 3.0}
    full = LatentSearch(grad_mode=FullGradient(), **kwargs)
    assert full.forward_equivalents(0) == 8  # one guided call: 4 steps x (cond + uncond)
    assert full.forward_equivalents(2) == 3 * 8 + 2 * 8 * 2
    assert LatentSearch(grad_mode=FullGradient(checkpoint=True), **kwargs).forward_equivalents(2) == 3 * 8 + 2 * 8 * 3
    assert LatentSearch(grad_mode=ResidualGradient(0.5), **kwargs).forward_equivalents(3) == 56
    unguided = LatentSearch(diffusion="tiny", num_steps=4, guidance_scale=1.0, grad_mode=FullGradient())
    assert unguided.forward_equivalents(1) == 2 * 4 + 4 * 2


@pytest.mark.parametrize("baseline", [RandomLatentSearch, RandomPerturbationSearch])
@pytest.mark.parametrize("grad_mode", [ResidualGradient(0.5), FullGradient(), FullGradient(checkpoint=True)])
@pytest.mark.parametrize("iterations", [0, 1, 3, 20])
def test_random_baselines_fill_the_sage_budget_in_forward_equivalents(baseline, grad_mode, iterations):
    kwargs = {"diffusion": "tiny", "num_steps": 5, "guidance_scale": 3.0, "grad_mode": grad_mode}
    budget = LatentSearch(**kwargs).forward_equivalents(iterations)
    search = baseline(match_sage_iterations=iterations, **kwargs)
    spent = search.forward_equivalents(search.max_iterations)
    assert spent <= budget < search.forward_equivalents(search.max_iterations + 1)  # as many draws as fit
    assert search.max_iterations >= iterations  # a draw is cheaper than a SAGE iteration


def _cli_model(*files: str, extra: tuple[str, ...] = ()):
    """The search ``sage fit --config F1 --config F2 ...`` would run (parsed and built, nothing run or loaded)."""
    from sage_lightning.cli import SageCLI

    args = [a for f in files for a in ("--config", str(REPO / "configs" / f))]
    return SageCLI(args=[*args, *extra, "--trainer.logger", "false"], run=False).model


@pytest.mark.parametrize("model", [[], ["models/sd15.yaml"]], ids=["shapesworld", "sd15"])
@pytest.mark.parametrize("baseline", ["random_latent.yaml", "random_perturbation.yaml"])
def test_baseline_configs_spend_the_budget_of_the_sage_config_they_follow(baseline, model, monkeypatch):
    """configs/random_*.yaml name no iteration count of their own: after latent_search.yaml they match its 20
    iterations on ShapesWorld, after models/sd15.yaml the paper's 100 (issue: they pinned 20 for both)."""
    from sage_lightning.models import tiny_scheduler
    from sage_lightning.searches import base

    monkeypatch.setattr(base, "load_scheduler", lambda *a, **k: tiny_scheduler())  # SD's config is on the hub
    no_ensemble = ("--model.init_args.ensemble", "null") if model else ()  # SD's members download weights
    sage = _cli_model("latent_search.yaml", *model, extra=no_ensemble)
    random = _cli_model("latent_search.yaml", *model, baseline, extra=no_ensemble)
    assert type(random).__name__ != type(sage).__name__
    assert random.match_sage_iterations == sage.max_iterations == (100 if model else 20)
    budget = sage.forward_equivalents(sage.max_iterations)
    assert random.forward_equivalents(random.max_iterations) <= budget
    assert budget < random.forward_equivalents(random.max_iterations + 1)
    again = _cli_model("latent_search.yaml", *model, baseline, extra=(*no_ensemble, "--model.init_args.max_iterations",
                                                                     "7"))
    assert again.match_sage_iterations == 7  # a SAGE budget given on the command line is followed too


def test_random_word_config_matches_the_prompt_search_k_it_follows():
    search = _cli_model("prompt_search.yaml", "prompt_random.yaml", extra=("--model.init_args.steps_per_word", "3"))
    k3 = search.word_rounds
    assert k3 == _cli_model("prompt_search.yaml", "prompt_random.yaml",
                            extra=("--model.init_args.match_sage_steps_per_word", "3")).word_rounds
    assert _cli_model("prompt_search.yaml", "prompt_random.yaml").word_rounds > k3  # K = 10 by default


def test_budget_is_known_before_set_up_so_the_cli_runs_every_draw():
    search = RandomPerturbationSearch(diffusion="tiny", num_steps=4, match_sage_iterations=SAGE_ITERATIONS)
    assert search.max_iterations == DRAWS and search._frozen is None  # nothing loaded yet
    world = RandomPerturbationSearch(diffusion="shapesworld", num_steps=20, match_sage_iterations=20)
    assert world.max_iterations == (21 * 40 + 20 * 10 * 2 * 2) // 40 - 1  # from the scheduler's config alone


# ------------------------------------------------------------------------------------- the draws
def _prepared(mode: str, box=(-1.0, 1.0)) -> RandomPerturbationSearch:
    search = RandomPerturbationSearch(diffusion="tiny", num_steps=3, mode=mode, max_iterations=4)
    search.prepare(ClassPromptDataModule(classes=["star", "ring"], seeds_per_class=2).targets)
    search.box = box
    return search


def test_uniform_draws_fill_the_box():
    search = _prepared("uniform", box=(-0.5, 1.0))
    delta = search.perturbation(1, 1)
    assert tuple(delta.shape) == search.latent_shape()
    assert delta.min() >= -0.5 and delta.max() <= 1.0
    assert delta.min() < -0.45 and delta.max() > 0.95 and abs(float(delta.mean()) - 0.25) < 0.02


def test_corner_draws_are_random_sign_vectors_at_the_corners():
    search = _prepared("corners")
    delta = search.perturbation(0, 1)
    assert set(delta.unique().tolist()) == {-1.0, 1.0}
    assert abs(float((delta > 0).float().mean()) - 0.5) < 0.03
    assert not torch.equal(delta, search.perturbation(0, 2))  # a fresh corner every draw


def test_sign_walk_steps_every_entry_by_sages_lr_from_the_current_delta():
    search = _prepared("sign_walk")
    search.delta.data[1] = 0.3
    step = search.perturbation(1, 1) - 0.3
    torch.testing.assert_close(step.abs(), torch.full_like(step, search.lr))  # SAGE's own step size, every entry
    assert abs(float((step > 0).float().mean()) - 0.5) < 0.05
    assert torch.equal(search.perturbation(1, 1), 0.3 + step)  # seeded by (target, draw): reproducible
    assert not torch.equal(step, search.perturbation(1, 2) - 0.3)  # a fresh sign vector every step


def test_draws_depend_on_seed_and_draw_index_only_and_start_from_z0():
    a, b = _prepared("uniform"), _prepared("uniform")
    assert torch.equal(a.perturbation(1, 3), b.perturbation(1, 3))
    assert not torch.equal(a.perturbation(1, 3), a.perturbation(1, 4))
    assert not torch.equal(a.perturbation(0, 3), a.perturbation(1, 3))  # seeds 0 and 1
    ids = torch.tensor([0, 1, 2, 3])
    z = torch.stack([a.draw(int(i), 0) for i in ids])
    assert torch.equal(z, LatentSearch.initial_latents(a, ids))  # iteration 0 is SAGE's own z0


def test_noisy_scheduler_noise_is_each_targets_own_reproducible_and_apart_from_the_draws():
    """euler-a: every draw's scheduler noise is SAGE's for that target (its seed's generator), whatever the
    global random state and however many deltas were drawn meanwhile; no two targets share a delta stream
    (not even two classes on one seed, which share z0 and, as in SAGE, the scheduler noise)."""
    def prepared(cls=RandomPerturbationSearch):
        search = cls(diffusion="tiny", num_steps=3, scheduler="euler-a", max_iterations=4)
        search.prepare(ClassPromptDataModule(classes=["star", "ring"], seeds_per_class=2).targets)
        search.box, search.trainer = (-1.0, 1.0), None
        return search

    a, b, sage_search = prepared(), prepared(), prepared(LatentSearch)
    assert a.sampler.draws_noise
    ids = torch.arange(4)  # star/seed 0, star/seed 1, ring/seed 0, ring/seed 1
    seeds = [t.seed for t in a.targets]
    assert [a.noise_seed(int(i), 3) for i in ids] == seeds  # SAGE's noise at every draw, not a fresh seed's
    z = LatentSearch.initial_latents(a, ids) + torch.stack([a.perturbation(int(i), 3) for i in ids])
    cond = a.prompt_embeddings([t.prompt for t in a.targets])
    images = []
    for search, noise, global_seed in ((a, a.noise_seed, 0), (b, b.noise_seed, 1), (sage_search, None, 2)):
        torch.manual_seed(global_seed)
        b.perturbation(0, 1)  # a draw between generations takes nothing from the noise
        with torch.no_grad():  # SAGE seeds each row's noise with its target's seed
            images.append(search.generate(z, cond, [noise(int(i), 3) for i in ids] if noise else seeds))
    assert torch.equal(images[0], images[1]) and torch.equal(images[0], images[2])
    with torch.no_grad():  # the noise is the target's: another target's seed gives another image
        other = a.generate(z[:1], cond[:1], [a.noise_seed(1, 3)])
    assert not torch.equal(other, images[0][:1])
    draw_seeds = {a.draw_seed(int(i), d) for i in ids for d in range(1, 5)}
    assert len(draw_seeds) == 16 and not draw_seeds & {a.noise_seed(int(i), 0) for i in ids}
    assert not torch.equal(a.perturbation(0, 2), a.perturbation(2, 2))  # star and ring on seed 0: own deltas


# -------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("perturb") / "run"
    sage(*_args(run, *ONE_DEVICE))
    return run


def _assert_every_target_finished_within_budget(run: Path, draws: int) -> list[dict]:
    rows = results(run)
    assert [r["target"] for r in rows] == list(range(6))  # every target exactly once
    assert any(not r["found"] for r in rows), "no target exhausted: the budget check below would be empty"
    for r in rows:
        assert r["found"] or r["iterations"] == draws  # an exhausted target used every draw it was given
        assert r["unet_evaluations"] == (r["iterations"] + 1) * 8  # forward only: 8 = one guided tiny call
    return rows


def test_run_finishes_every_target_and_spends_exactly_the_budget(reference_run):
    rows = _assert_every_target_finished_within_budget(reference_run, DRAWS)
    for r in rows:
        z = _latents(reference_run)[Path(r["latent"]).name]
        if r["iterations"]:  # a draw: moved off z0, put on the Gaussian shell inside the box (LatentProjection)
            assert not torch.equal(z["z"], z["z0"])
            assert abs(z["z"].norm().item() / z["z"].numel() ** 0.5 - 1) < 1e-4
            assert (z["z"] - z["z0"]).abs().max() <= 1.0 + 1e-5
        else:
            assert torch.equal(z["z"], z["z0"])
    assert (reference_run / "summary.json").is_file() and (reference_run / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize(
    ("config", "extra"),
    [(PERTURB, ["--model.init_args.mode", "corners"]), (PERTURB, ["--model.init_args.mode", "sign_walk"]),
     (FRESH, [])],
    ids=["corners", "sign_walk", "fresh"],
)
def test_other_baselines_finish_every_target_and_spend_exactly_the_budget(config, extra, tmp_path):
    run = tmp_path / "run"
    sage(*_args(run, *extra, config=config))
    _assert_every_target_finished_within_budget(run, DRAWS)


def test_resume_after_sigkill_equals_uninterrupted_run(reference_run, tmp_path):
    run = tmp_path / "run"
    kill_after_first_checkpoint(run, *_args(run, *ONE_DEVICE))
    assert not (run / "summary.json").exists()
    sage("fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last")
    _assert_same_run(reference_run, run)
    assert results(reference_run) == results(run)


def test_ddp_on_two_cpu_processes_equals_one_device(reference_run, tmp_path):
    run = tmp_path / "ddp"
    sage(*_args(run, "--trainer.devices", "2", "--trainer.strategy", "ddp", *ONE_DEVICE))
    _assert_same_run(reference_run, run)


def test_a_config_that_lists_no_constraints_runs_under_the_searchs_own(reference_run, tmp_path):
    """The box and the shell belong to the search (issue 21 item 2): a config without the ClampPerturbation and
    LatentProjection callbacks gets SAGE's own ([-1, 1], the shell), the same run as the config that lists them."""
    run = tmp_path / "r"
    sage(*_args(run, "--trainer.callbacks", "[]", *ONE_DEVICE))
    _assert_same_run(reference_run, run)


def test_an_unknown_mode_is_refused():
    with pytest.raises(Exception, match="mode='edge'"):
        RandomPerturbationSearch(diffusion="tiny", mode="edge")
