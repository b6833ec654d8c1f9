"""The universal token's chance level (issue 14): a random token of the trained token's norm, never trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, results, sage
from safetensors import safe_open
from safetensors.torch import save_file

from sage_lightning.datamodules import PromptSetDataModule
from sage_lightning.errors import SageError
from sage_lightning.searches import RandomTokenSearch
from sage_lightning.searches.base import EXHAUSTED

TINY = REPO / "configs" / "universal_token_tiny.yaml"
CLASSES = ["ring", "heart", "circle"]


def _reference(folder: Path, norm: float = 3.7, target: str = "star", dim: int = 32) -> Path:
    g = torch.randn(dim, generator=torch.Generator().manual_seed(123))
    path = folder / "token.safetensors"
    save_file({"embedding": g * (norm / g.norm())}, str(path), metadata={"target": target, "dimension": str(dim)})
    return path


def _prepared(**kwargs) -> RandomTokenSearch:
    search = RandomTokenSearch(target="star", diffusion="tiny", num_steps=2, max_iterations=5, **kwargs)
    data = PromptSetDataModule(classes=CLASSES, seeds_per_class=1, held_out_templates=["a drawing of a {}"])
    search.prepare(data.targets, data.held_out)
    return search


def test_random_token_has_the_reference_norm_and_a_seeded_random_direction(tmp_path):
    path = _reference(tmp_path)
    reference = safe_open(str(path), "pt").get_tensor("embedding")
    search = _prepared(reference=str(tmp_path))  # a run folder works as well as the file
    token = search.token.detach()
    assert token.shape == reference.shape
    assert float(token.norm()) == pytest.approx(3.7, rel=1e-5)
    assert abs(float(torch.nn.functional.cosine_similarity(token, reference, dim=0))) < 0.9
    assert torch.equal(token, _prepared(reference=str(path)).token.detach())  # same draw_seed: same token
    other = _prepared(reference=str(path), draw_seed=1).token.detach()
    assert not torch.equal(token, other) and float(other.norm()) == pytest.approx(3.7, rel=1e-5)
    assert float(_prepared(norm=0.5).token.detach().norm()) == pytest.approx(0.5, rel=1e-5)


def test_random_token_stays_in_the_box_the_trained_token_is_clamped_to():
    """Like with like (issue 21 item 10): at the norm of a trained token near its box's faces, a Gaussian direction
    scaled to that norm has entries beyond [-2.5, 2.5]; the random token is bent along the box, norm kept."""
    import lightning as L

    from sage_lightning.callbacks import ClampPerturbation

    g = torch.randn(32, generator=torch.Generator().manual_seed(0))
    assert float((g * (12.0 / g.norm())).abs().max()) > 2.5  # the plain scaled draw leaves the box
    token = _prepared(norm=12.0).token.detach()
    assert float(token.abs().max()) <= 2.5 and float(token.norm()) == pytest.approx(12.0, rel=1e-5)
    assert float(torch.nn.functional.cosine_similarity(token, g, dim=0)) > 0.9  # still the seeded direction
    search = RandomTokenSearch(target="star", diffusion="tiny", num_steps=2, norm=4.0)
    search.trainer = L.Trainer(callbacks=[ClampPerturbation(-1.0, 1.0)], logger=False, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False)
    data = PromptSetDataModule(classes=CLASSES, seeds_per_class=1, held_out_templates=["a drawing of a {}"])
    search.prepare(data.targets, data.held_out)  # the run's own box: [-1, 1]
    assert float(search.token.detach().abs().max()) <= 1.0 and float(search.token.detach().norm()) == pytest.approx(
        4.0, rel=1e-5)
    with pytest.raises(SageError, match=r"norm 15 does not fit the clamp box \[-2.5, 2.5\]"):
        _prepared(norm=15.0)  # more than 2.5 * sqrt(32)


def test_nothing_is_optimised():
    search = _prepared(norm=1.0)
    assert search.max_iterations == 0 and bool((search.status == EXHAUSTED).all()) and not search.running_targets()


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda d: {"reference": str(_reference(d, target="heart"))}, "trained towards 'heart'"),
        (lambda d: {"reference": str(_reference(d, dim=16))}, "16 dimensions"),
        (lambda d: {"reference": str(d / "missing.safetensors")}, "does not exist"),
        (lambda d: {"reference": str(_reference(d)), "norm": 1.0}, "not both"),
        (lambda d: {}, "give reference"),
        (lambda d: {"norm": -1.0}, "must be > 0"),
    ],
)
def test_bad_reference_is_one_clear_error(make, needle, tmp_path):
    with pytest.raises(SageError, match=needle):
        _prepared(**make(tmp_path))


def test_cli_run_writes_the_random_token_and_its_hit_rates(tmp_path):
    cfg = yaml.safe_load(TINY.read_text())  # the tiny config without the CLIP-score logger (ShapesWorld CLIP)
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if "ClipScore" not in c["class_path"]]
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    path = _reference(tmp_path)
    run = tmp_path / "run"
    proc = sage("fit", "--config", str(config), "--config", str(REPO / "configs" / "random_token.yaml"),
                "--model.init_args.reference", str(path), "--trainer.default_root_dir", str(run))
    (line,) = [line for line in proc.stdout.splitlines() if " summary: " in line]
    assert line.startswith("RandomTokenSearch summary: token -> 'star'") and "SAGE" not in line  # names the search
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 0 and summary["token_norm"] == pytest.approx(3.7, rel=1e-5)
    with safe_open(str(run / "token.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("embedding"), _prepared(reference=str(path)).token.detach())
    rows = results(run)
    assert [r["prompt"] for r in rows] == [f"a drawing of a {c}" for c in CLASSES]  # the same held-out prompts
    assert summary["hit_rate_ensemble"]["with_token"] == sum(r["with_token"]["hit"] for r in rows) / 3
