"""The latent search's constraints (issue 10, item 5): after a step, delta is in the clamp box AND z = z0 + delta
is on the Gaussian shell |z| = sqrt(d), whatever the order of ClampPerturbation and LatentProjection."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from sage_lightning.callbacks import ClampPerturbation, LatentProjection
from sage_lightning.datamodules import ClassPromptDataModule
from sage_lightning.searches import LatentSearch


@pytest.fixture(scope="module")
def search() -> LatentSearch:
    search = LatentSearch(diffusion="tiny", num_steps=2)
    search.prepare(ClassPromptDataModule(classes=["star", "ring"], seeds_per_class=2).targets)
    return search


def _at_the_edge(search: LatentSearch, lr: float = 0.05) -> torch.Tensor:
    """delta at the box's edge after a sign step past it: a corner (+1), the opposite corner, mixed signs."""
    n = len(search.targets)
    signs = torch.ones(n, *search.delta.shape[1:])
    signs[1] = -1
    signs[2] = torch.sign(torch.randn(signs[2].shape, generator=torch.Generator().manual_seed(0)))
    signs[3] = search.initial_latents(torch.tensor([3]))[0].sign()  # outwards from z0: the largest |z|
    return signs * (1 + lr)


def _step(search: LatentSearch, delta: torch.Tensor, callbacks: list) -> torch.Tensor:
    with torch.no_grad():
        search.delta.copy_(delta)
    search.stepped_targets = torch.arange(len(search.targets))
    trainer = SimpleNamespace(callbacks=callbacks)
    for callback in callbacks:
        callback.on_train_batch_end(trainer, search, None, None, 0)
    return search.delta.detach().clone()


def test_step_result_is_in_the_box_and_on_the_shell_in_either_order(search):
    clamp, projection = ClampPerturbation(-1.0, 1.0), LatentProjection()
    edge = _at_the_edge(search)
    z0 = search.initial_latents(torch.arange(len(search.targets)))
    d = z0[0].numel()
    results = [_step(search, edge, order) for order in ([clamp, projection], [projection, clamp])]
    for delta in results:
        assert delta.abs().max() <= 1.0  # exactly the box, no tolerance
        ratio = (z0 + delta).flatten(1).norm(dim=1) / math.sqrt(d)
        assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5), ratio
        assert (delta.abs() == 1).any()  # entries stay at the edge where the shell allows it
    assert torch.allclose(results[0], results[1], atol=1e-6)  # the order does not change the result


def test_inside_the_box_projection_is_the_plain_shell_scaling(search):
    """Where no entry meets the box, the projection is z * sqrt(d) / |z| (as without a clamp)."""
    small = 0.01 * torch.randn(search.delta.shape, generator=torch.Generator().manual_seed(1))
    boxed = _step(search, small, [ClampPerturbation(-1.0, 1.0), LatentProjection()])
    free = _step(search, small, [LatentProjection()])
    assert torch.allclose(boxed, free, atol=1e-5)
    assert free.abs().max() < 1.0


# ------------------------------------------------------------------------- the search owns its constraints
def _added(search, given: list | None = None) -> dict[str, tuple]:
    """The callbacks the search adds to a run that has ``given`` (name -> clamp range, or () for the others)."""
    import lightning as L

    if given is not None:
        search.trainer = L.Trainer(callbacks=given, logger=False, enable_checkpointing=False,
                                   enable_progress_bar=False, enable_model_summary=False)
    return {type(c).__name__: (c.low, c.high) if isinstance(c, ClampPerturbation) else ()
            for c in search.configure_callbacks()}


def test_every_search_brings_its_constraints_and_a_config_changes_but_never_drops_them():
    """Issue 21 item 2: LatentSearch(...) from Python, as its docstring shows, runs clamped and on the shell; the
    token and prompt slots are clamped to [-2.5, 2.5]; a config's own clamp replaces the default one."""
    from sage_lightning.candidates import WordListCandidates
    from sage_lightning.searches import PromptSearch, RandomLatentSearch, RandomWordSearch, UniversalTokenSearch

    latent = _added(LatentSearch(diffusion="tiny"))
    assert latent["ClampPerturbation"] == (-1.0, 1.0) and "LatentProjection" in latent
    assert _added(UniversalTokenSearch(diffusion="tiny"))["ClampPerturbation"] == (-2.5, 2.5)
    prompt = PromptSearch(candidates=WordListCandidates(["red"]), diffusion="tiny")
    assert list(_added(prompt)) == ["PromptResultWriter", "ClampPerturbation", "TokenSnapping"]  # clamp, then snap
    assert _added(prompt)["ClampPerturbation"] == (-2.5, 2.5)
    assert _added(LatentSearch(diffusion="tiny"), [ClampPerturbation(-0.5, 0.5)]) == {
        "FailureWriter": (), "LatentProjection": ()}  # the config's box is the run's: no second, default clamp
    for baseline in (RandomLatentSearch(diffusion="tiny"), RandomWordSearch(candidates=WordListCandidates(["red"]),
                                                                             diffusion="tiny")):
        assert not {"ClampPerturbation", "LatentProjection"} & set(_added(baseline))  # nothing to constrain


def test_a_latent_search_from_python_stays_in_its_box_and_on_the_shell(tmp_path):
    import lightning as L

    search = LatentSearch(diffusion="tiny", num_steps=3, max_iterations=3, lr=0.6)  # large steps: past the box
    data = ClassPromptDataModule(classes=["star", "heart"], seeds_per_class=1, batch_size=2)
    trainer = L.Trainer(default_root_dir=str(tmp_path), max_epochs=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(search, datamodule=data)
    delta = search.delta.detach()
    assert float(delta.abs().max()) <= 1.0 + 1e-6 and float(delta.abs().max()) > 0.6
    z = search.initial_latents(torch.arange(len(search.targets))) + delta
    moved = delta.flatten(1).abs().sum(1) > 0
    assert moved.any()
    norms = z.flatten(1).norm(dim=1) / math.sqrt(z[0].numel())
    assert torch.allclose(norms[moved], torch.ones_like(norms[moved]), atol=1e-4)


def test_channel_mean_bound_pulls_a_drifted_channel_back_and_stays_on_the_shell(search):
    """A step that shifts a whole latent channel (a global colour drift) is an outlier the norm does not see:
    with ``channel_mean_sigmas`` the projection brings that channel's mean back near the N(0, I) spread,
    leaves z on the shell and delta in the box; without it the drift stays."""
    drift = torch.zeros(search.delta.shape)
    drift[:, 1] = 0.4  # channel 1 moved by +0.4: ~6 sigma for a channel of 256 entries
    z0 = search.initial_latents(torch.arange(len(search.targets)))
    n = z0[0, 0].numel()
    bound = 3.0 / math.sqrt(n)
    clamp = ClampPerturbation(-1.0, 1.0)
    plain = _step(search, drift, [clamp, LatentProjection()])
    bounded = _step(search, drift, [clamp, LatentProjection(channel_mean_sigmas=3.0)])
    assert ((z0 + plain)[:, 1].flatten(1).mean(1) > 2 * bound).all()
    means = (z0 + bounded).flatten(2).mean(-1)
    assert (means.abs() <= bound * 1.05).all(), means
    ratio = (z0 + bounded).flatten(1).norm(dim=1) / math.sqrt(z0[0].numel())
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5) and bounded.abs().max() <= 1.0
    with pytest.raises(ValueError, match="channel_mean_sigmas"):
        LatentProjection(channel_mean_sigmas=0.0)


def test_channel_shift_zero_keeps_z0s_channel_means_and_the_shell(search):
    """``channel_shift_sigmas=0``: a step that shifts whole channels (a global recolouring) and also moves single
    entries keeps z0's channel means (up to the shell's rescaling) and only the entries' pattern moves; z on the
    shell, delta in the box."""
    step = torch.zeros(search.delta.shape)
    step[:, 2] = -0.3
    step[:, 0, 3, 3] = 0.8
    z0 = search.initial_latents(torch.arange(len(search.targets)))
    clamp = ClampPerturbation(-1.0, 1.0)
    kept = _step(search, step, [clamp, LatentProjection(channel_shift_sigmas=0.0)])
    shift = (z0 + kept).flatten(2).mean(-1) - z0.flatten(2).mean(-1)
    assert shift.abs().max() < 0.01, shift  # -0.3 without the option
    assert (kept[:, 0, 3, 3] > 0.5).all()  # the entry's own move survives
    ratio = (z0 + kept).flatten(1).norm(dim=1) / math.sqrt(z0[0].numel())
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5) and kept.abs().max() <= 1.0
    plain = _step(search, step, [clamp, LatentProjection()])
    assert ((z0 + plain)[:, 2].flatten(1).mean(1) - z0[:, 2].flatten(1).mean(1) < -0.2).all()
    with pytest.raises(ValueError, match="channel_shift_sigmas=-1"):
        LatentProjection(channel_shift_sigmas=-1.0)


def test_mean_bound_stops_every_channel_drifting_one_way_and_keeps_channel_contrasts(search):
    """``mean_sigmas``: a step that moves every channel the same way (the drift behind the KS rejections: several
    channels at +3 sigma) is pulled back to the N(0, I) spread of the latent's overall mean (or z0's own, if that
    lies farther out), while a step that moves channels in opposite directions (a colour contrast, mean 0) is left
    as it was; z on the shell, delta in the box."""
    z0 = search.initial_latents(torch.arange(len(search.targets)))
    d = z0[0].numel()
    bound = torch.maximum(z0.flatten(1).mean(1).abs(), torch.full((len(z0),), 1.0 / math.sqrt(d)))
    clamp = ClampPerturbation(-1.0, 1.0)
    drift = torch.full(search.delta.shape, 0.15)
    plain = _step(search, drift, [clamp, LatentProjection()])
    bounded = _step(search, drift, [clamp, LatentProjection(mean_sigmas=1.0)])
    assert ((z0 + plain).flatten(1).mean(1) > 3 * bound).all()
    assert ((z0 + bounded).flatten(1).mean(1).abs() <= bound * 1.05).all()
    ratio = (z0 + bounded).flatten(1).norm(dim=1) / math.sqrt(d)
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5) and bounded.abs().max() <= 1.0
    contrast = torch.zeros(search.delta.shape)
    contrast[:, 0], contrast[:, 1] = 0.2, -0.2
    kept = _step(search, contrast, [clamp, LatentProjection(mean_sigmas=1.0)])
    free = _step(search, contrast, [clamp, LatentProjection()])
    assert torch.allclose(kept, free, atol=1e-4)
    zero = torch.zeros(search.delta.shape)  # z0 itself, whatever its mean: the bound adds nothing to the shell's move
    assert torch.allclose(_step(search, zero, [LatentProjection(mean_sigmas=1.0)]),
                          _step(search, zero, [LatentProjection()]), atol=1e-6)
    with pytest.raises(ValueError, match="mean_sigmas=0"):
        LatentProjection(mean_sigmas=0.0)


def test_the_shipped_latent_config_bounds_channel_means_and_the_overall_mean(search):
    """configs/latent_search.yaml's projection, built from the file as LightningCLI builds it, pulls an all-channel
    drift back within the overall-mean bound (the setting measured in benchmarks/README.md, "Fifth round")."""
    import importlib

    import yaml
    from helpers import REPO

    config = yaml.safe_load((REPO / "configs" / "latent_search.yaml").read_text())
    spec = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("LatentProjection"))
    module, name = spec["class_path"].rsplit(".", 1)
    projection = getattr(importlib.import_module(module), name)(**spec["init_args"])
    z0 = search.initial_latents(torch.arange(len(search.targets)))
    bound = torch.maximum(z0.flatten(1).mean(1).abs(), torch.full((len(z0),), 1.0 / math.sqrt(z0[0].numel())))
    moved = _step(search, torch.full(search.delta.shape, 0.15), [ClampPerturbation(-1.0, 1.0), projection])
    assert ((z0 + moved).flatten(1).mean(1).abs() <= bound * 1.05).all()
