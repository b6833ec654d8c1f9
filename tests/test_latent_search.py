"""Latent-space SAGE end to end on the tiny stack: outputs, resume after SIGKILL, DDP, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import REPO, assert_fit_refused, error_of, kill_after_first_checkpoint, results, sage
from safetensors.torch import load_file

from sage_lightning.callbacks import ClampPerturbation
from sage_lightning.datamodules import ClassPromptDataModule
from sage_lightning.models import default_ensemble
from sage_lightning.searches import LatentSearch, RandomLatentSearch

TINY = str(REPO / "configs" / "latent_search_tiny.yaml")


def latents(run: Path) -> dict[str, torch.Tensor]:
    return {p.name: load_file(p)["z"] for p in sorted((run / "latents").glob("*.safetensors"))}


def assert_same_run(a: Path, b: Path) -> None:
    ra, rb = results(a), results(b)
    assert [r["target"] for r in ra] == [r["target"] for r in rb]
    assert ra == rb
    la, lb = latents(a), latents(b)
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)


# ------------------------------------------------------------------------------------ the module
def _prepared(max_iterations=2, classes=("star", "ring")):
    search = LatentSearch(diffusion="tiny", num_steps=3, max_iterations=max_iterations)
    data = ClassPromptDataModule(classes=list(classes), seeds_per_class=2)
    search.prepare(data.targets)
    return search


def test_classes_given_by_index_keep_their_index_when_names_repeat():
    """open_clip's ImageNet names repeat ("missile" 657 and 744): a class given by index is that class, never the
    first class of the same name (issue 21 item 1); the ambiguous name itself is refused, naming the indices."""
    from sage_lightning.errors import SageError
    from sage_lightning.surrogate import ClassifierEnsemble, TimmMember

    names = ["star", "missile", "ring", "missile"]
    data = ClassPromptDataModule(classes=[3, 1, "ring"], seeds_per_class=1)
    assert [(t.class_name, t.class_index) for t in data.targets(names)] == [("missile", 3), ("missile", 1),
                                                                            ("ring", 2)]
    with pytest.raises(SageError, match=r"'missile' is ambiguous \(indices \[1, 3\]\)"):
        ClassPromptDataModule(classes=["missile"]).targets(names)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ensemble = ClassifierEnsemble([TimmMember("test_resnet", names)])
    search = LatentSearch(diffusion="tiny", num_steps=2, max_iterations=1, ensemble=ensemble)
    search.prepare(data.targets)
    assert search.class_index.tolist() == [3, 1, 2]


def test_only_trainable_parameters_are_the_perturbations_and_checkpoint_is_small():
    search = _prepared()
    names = [n for n, p in search.named_parameters() if p.requires_grad]
    assert names == ["delta"]
    assert tuple(search.delta.shape) == (4, 4, 32, 32)
    assert list(search.state_dict()) == ["delta"]  # frozen UNet, VAE, text encoder and D are not saved


def test_gradient_reaches_only_the_targets_in_the_batch():
    search = _prepared()
    search.trainer = None
    ids = torch.tensor([1, 2])
    z = search.initial_latents(ids) + search.delta[ids]
    images = search.generate(z, search.prompt_embeddings([search.targets[i].prompt for i in ids.tolist()]))
    search.frozen.ensemble(images, search.class_index[ids]).loss.backward()
    per_target = search.delta.grad.flatten(1).abs().sum(1)
    assert per_target[1] > 0 and per_target[2] > 0 and per_target[0] == 0 and per_target[3] == 0


class _CountingBackwards(LatentSearch):
    """Counts the backwards that reach the images (each one a backward through the graphed UNet steps)."""

    backwards = 0

    def generate(self, latents, cond, seeds=None):
        images = super().generate(latents, cond, seeds)
        if images.requires_grad:
            images.register_hook(self._count)
        return images

    def _count(self, grad):
        type(self).backwards += 1


def test_backwards_run_are_the_backwards_charged(tmp_path):
    """One backward per update, none for a target's last evaluation (it has just stopped: issue 21 item 5), so
    forward_equivalents, which charges one backward per iteration, counts what ran (batch_size 1)."""
    import lightning as L

    search = _CountingBackwards(diffusion="tiny", num_steps=3, max_iterations=2)
    data = ClassPromptDataModule(classes=["star", "heart"], seeds_per_class=1, batch_size=1)
    trainer = L.Trainer(default_root_dir=str(tmp_path), max_epochs=10, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(search, datamodule=data)
    rows = results(tmp_path)
    assert len(rows) == 2 and sum(r["iterations"] for r in rows) > 0
    assert _CountingBackwards.backwards == sum(r["iterations"] for r in rows)


def test_initial_latents_depend_on_seed_only():
    a = _prepared(classes=("star", "ring"))
    b = _prepared(classes=("heart", "ring"))
    assert torch.equal(a.initial_latents(torch.tensor([0, 1])), b.initial_latents(torch.tensor([0, 1])))
    assert not torch.equal(a.initial_latents(torch.tensor([0])), a.initial_latents(torch.tensor([1])))


def test_random_baseline_spends_the_same_forward_equivalent_budget():
    sage_search = _prepared(max_iterations=5)
    baseline = RandomLatentSearch(diffusion="tiny", num_steps=3, match_sage_iterations=5)
    baseline.prepare(ClassPromptDataModule(classes=["star"]).targets)
    budget = sage_search.forward_equivalents(5)
    spent = baseline.forward_equivalents(baseline.max_iterations)
    assert budget - baseline.sampler.unet_evaluations(1) < spent <= budget
    assert spent == baseline.unet_evaluations(baseline.max_iterations)  # draws: forwards only


# -------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    sage("fit", "--config", TINY, "--trainer.default_root_dir", str(run))
    return run


def test_run_folder_holds_every_output(reference_run):
    rows = results(reference_run)
    assert [r["target"] for r in rows] == list(range(6))  # every target exactly once
    for r in rows:
        assert (reference_run / r["image"]).is_file() and (reference_run / r["clean_image"]).is_file()
        z = load_file(reference_run / r["latent"])
        assert set(z) == {"z", "z0"}
        assert abs(z["z"].norm().item() / (z["z"].numel() ** 0.5) - 1) < 1e-4 or r["iterations"] == 0  # shell
        assert (z["z"] - z["z0"]).abs().max() <= 1.0 + 1e-5 or r["iterations"] == 0
        assert r["found"] or r["iterations"] == 3
        assert set(r["probs"]) == {"0:test_resnet", "1:test_vit", "2:canny+test_resnet"}
        assert r["unet_evaluations"] == (r["iterations"] + 1) * 8 + r["iterations"] * 4
        assert r["forward_equivalents"] == (r["iterations"] + 1) * 8 + r["iterations"] * 4 * 2  # backward = 2
    for name in ("config.yaml", "summary.json", "checkpoints/last.ckpt"):
        assert (reference_run / name).is_file()
    summary = json.loads((reference_run / "summary.json").read_text())
    assert summary["finished"] == 6
    searched = 6 - summary["already_failing"]  # targets whose clean image already fails D are left out
    failures = sum(r["found"] and not r["already_failing"] for r in rows)
    assert summary["ssr_discriminator"] == pytest.approx(failures / searched)


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    longer = ["--model.init_args.max_iterations", "8"]
    reference = tmp_path / "reference"
    sage("fit", "--config", TINY, "--trainer.default_root_dir", str(reference), *longer)
    run = tmp_path / "run"
    kill_after_first_checkpoint(run, "fit", "--config", TINY, "--trainer.default_root_dir", str(run), *longer)
    assert not (run / "summary.json").exists()
    assert len((run / "results.jsonl").read_text().splitlines()) < 6 if (run / "results.jsonl").exists() else True
    sage("fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last")
    assert_same_run(reference, run)


def test_ddp_on_two_cpu_processes_equals_one_device(reference_run, tmp_path):
    run = tmp_path / "ddp"
    sage(
        "fit",
        "--config",
        TINY,
        "--trainer.default_root_dir",
        str(run),
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--data.init_args.batch_size",
        "1",
    )
    single = tmp_path / "single"
    sage("fit", "--config", TINY, "--trainer.default_root_dir", str(single), "--data.init_args.batch_size", "1")
    assert_same_run(single, run)


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--data.init_args.classes", "[stra]"], "unknown class 'stra'"),
        (["--data.init_args.classes", "[]"], "target list is empty"),
        (["--model.init_args.diffusion", "./no/such/model"], "does not exist"),
        (["--model.init_args.num_steps", "0"], "num_steps=0"),
        (["--data.init_args.templates", "[a photo]"], "must contain exactly one"),
    ],
)
def test_bad_input_is_one_clear_line(extra, needle, capsys, tmp_path):
    assert_fit_refused(TINY, tmp_path / "r", extra, needle, capsys)


def test_reversed_clamp_range_and_unknown_key(capsys, tmp_path):
    with pytest.raises(Exception, match=r"clamp range \[1.0, -1.0\]"):
        ClampPerturbation(1.0, -1.0)
    err = error_of(["fit", "--config", TINY, "--model.init_args.no_such_key", "1"], capsys)
    assert "no_such_key" in err


def test_existing_results_are_never_overwritten_and_corrupt_checkpoint(reference_run, capsys, tmp_path):
    before = (reference_run / "results.jsonl").read_text()
    err = error_of(["fit", "--config", TINY, "--trainer.default_root_dir", str(reference_run)], capsys)
    assert "already holds results.jsonl" in err
    assert (reference_run / "results.jsonl").read_text() == before
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    err = error_of(
        ["fit", "--config", TINY, "--trainer.default_root_dir", str(tmp_path / "x"), "--ckpt_path", str(bad)], capsys
    )
    assert "is unreadable" in err and str(bad) in err


def test_default_ensemble_of_tiny_has_three_members():
    assert len(default_ensemble("tiny").members) == 3


def test_distinct_seeds_give_every_target_its_own_z0():
    from sage_lightning.datamodules import ClassPromptDataModule

    shared = ClassPromptDataModule(classes=["star", "ring"], seeds_per_class=3, base_seed=100).targets(["star", "ring"])
    assert [t.seed for t in shared] == [100, 101, 102, 100, 101, 102]  # every class on the same seeds
    own = ClassPromptDataModule(classes=["star", "ring"], seeds_per_class=3, base_seed=100,
                                distinct_seeds=True).targets(["star", "ring"])
    assert [t.seed for t in own] == [100, 101, 102, 103, 104, 105]
    assert [(t.class_name, t.prompt) for t in own] == [(t.class_name, t.prompt) for t in shared]


def test_default_ensemble_of_tiny_leaves_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    first = default_ensemble("tiny")
    assert torch.equal(torch.rand(4), expected)  # the global stream goes on as if nothing had drawn from it
    torch.manual_seed(7)
    second = default_ensemble("tiny")  # and the weights do not depend on it: fixed random weights
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(),
                                                    strict=True))
