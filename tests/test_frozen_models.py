"""Frozen models (the diffusion model and the discriminator D) are never saved, moved by DDP or trained,
even when a config gives the ensemble (ARCHITECTURE.md: "Models that are frozen are never checkpointed
and never synchronised by DDP")."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from sage_lightning.callbacks import ClampPerturbation
from sage_lightning.candidates import WordListCandidates
from sage_lightning.datamodules import ClassPromptDataModule, PromptSetDataModule
from sage_lightning.models import default_ensemble
from sage_lightning.searches import (
    LatentSearch,
    PromptSearch,
    RandomLatentSearch,
    RandomWordSearch,
    UniversalTokenSearch,
)

COMMON = {"diffusion": "tiny", "num_steps": 2, "guidance_scale": 1.0}
WORDS = ["on", "a", "red", "blue"]

# search class, its arguments, its datamodule, the parameter names a checkpoint may hold
SEARCHES = {
    "latent": (LatentSearch, {"max_iterations": 1}, ClassPromptDataModule, {"delta"}),
    "random_latent": (RandomLatentSearch, {"max_iterations": 1}, ClassPromptDataModule, set()),
    "prompt": (
        PromptSearch,
        {"candidates": WordListCandidates(WORDS), "max_words": 1, "steps_per_word": 1, "eval_seeds": 1,
         "judge": None},
        ClassPromptDataModule,
        {"slots"},
    ),
    "random_word": (
        RandomWordSearch,
        {"candidates": WordListCandidates(WORDS), "max_words": 1, "eval_seeds": 1, "judge": None},
        ClassPromptDataModule,
        set(),
    ),
    "universal_token": (
        UniversalTokenSearch,
        {"target": "star", "max_iterations": 1},
        PromptSetDataModule,
        {"token"},
    ),
}


@pytest.mark.parametrize("name", list(SEARCHES))
def test_a_config_given_ensemble_is_not_in_the_checkpoint_or_the_module_tree(name, tmp_path):
    cls, kwargs, data_cls, keys = SEARCHES[name]
    ensemble = default_ensemble("tiny")
    search = cls(ensemble=ensemble, **COMMON, **kwargs)
    data = data_cls(classes=["ring", "heart"], seeds_per_class=1, batch_size=2)
    callbacks = [ClampPerturbation(-1.0, 1.0)] if keys else []
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_epochs=1, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    trainer.fit(search, datamodule=data)
    assert search.frozen.ensemble is ensemble  # the given ensemble is the one in use
    assert not any(m is ensemble for m in search.modules())  # not a submodule: DDP never wraps or syncs it
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert set(saved) == keys
