"""Stable Diffusion defaults (issue 10 item 11): the paper's iteration budget, every ImageNet class name
and synonym kept out of candidate words, and model-specific values a ShapesWorld config must not carry
into a Stable Diffusion run."""

from __future__ import annotations

import pytest
import torch
import yaml
from helpers import REPO

from sage_lightning.callbacks import ClipScoreLogger
from sage_lightning.candidates import Candidate, WordListCandidates
from sage_lightning.datamodules import ClassPromptDataModule
from sage_lightning.errors import SageError
from sage_lightning.searches import LatentSearch, PromptSearch, UniversalTokenSearch
from sage_lightning.surrogate import ClassifierEnsemble, TimmMember, imagenet_class_names
from sage_lightning.surrogate.classnames import class_synonyms

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CONFIGS = REPO / "configs"


def _init_args(*files: str) -> dict:
    """``model.init_args`` of config files given in this order (later files override earlier ones)."""
    merged: dict = {}
    for name in files:
        merged.update(yaml.safe_load((CONFIGS / name).read_text())["model"].get("init_args", {}))
    return merged


def test_stable_diffusion_latent_search_runs_the_papers_100_iterations():
    args = _init_args("latent_search.yaml", "models/sd15.yaml")
    assert args["diffusion"] == SD15 and "ensemble" in args
    assert LatentSearch(diffusion=SD15, max_iterations=args.get("max_iterations")).max_iterations == 100
    shapes = _init_args("latent_search.yaml")
    assert LatentSearch(diffusion="shapesworld", max_iterations=shapes.get("max_iterations")).max_iterations == 20


def test_imagenet_synonyms_are_the_wordnet_lemmas_of_each_class():
    synonyms = class_synonyms(imagenet_class_names())
    assert len(synonyms) == len(set(imagenet_class_names())) == 998  # "missile" and "sunglasses" name two classes
    assert "Carassius auratus" in synonyms["goldfish"]
    assert {"cab", "hack", "taxi"} <= set(synonyms["taxicab"])
    assert class_synonyms(["circle", "star"]) == {"circle": [], "star": []}


@pytest.fixture(scope="module")
def imagenet_prompt_search() -> PromptSearch:
    torch.manual_seed(0)
    ensemble = ClassifierEnsemble([TimmMember("test_resnet", "imagenet")])
    search = PromptSearch(candidates=WordListCandidates(["red"]), diffusion="tiny", num_steps=2, ensemble=ensemble,
                          judge=None, synonyms={"goldfish": ["fish"]})
    search.prepare(ClassPromptDataModule(classes=["goldfish"]).targets)
    return search


@pytest.mark.parametrize(
    ("word", "kept"),
    [
        ("tench", False),  # another class's name
        ("hack", False), ("taxi", False), ("taxis", False),  # synonyms (WordNet lemmas) of another class, plurals
        ("goldfish", False), ("fish", False),  # the class itself and its configured synonyms
        ("Carassius", False),  # a word of the class's own lemma
        ("great", True), ("white", True), ("red", True), ("small", True),  # words of other classes' multi-word names
    ],
)
def test_candidates_exclude_every_imagenet_class_name_and_synonym(imagenet_prompt_search, word, kept):
    accepted = imagenet_prompt_search.word_filter("goldfish").accept([Candidate(word, 1.0)])
    assert bool(accepted) == kept, word


def test_gpt2_candidates_config_excludes_class_names():
    assert _init_args("prompt_search.yaml", "models/sd15.yaml", "models/gpt2_candidates.yaml")["exclude_class_names"]


def test_shapesworld_clip_never_scores_another_model():
    search = UniversalTokenSearch(target="goldfish", diffusion=SD15)
    with pytest.raises(SageError) as err:
        ClipScoreLogger(model="shapesworld").setup(None, search, "fit")
    assert "ShapesWorld's CLIP" in str(err.value) and len(str(err.value).splitlines()) == 1
    ClipScoreLogger(model="shapesworld").setup(None, UniversalTokenSearch(diffusion="tiny"), "fit")  # allowed


def test_a_shapesworld_target_is_refused_for_imagenet_in_one_line():
    target = _init_args("universal_token.yaml")["target"]
    search = UniversalTokenSearch(target=target, diffusion=SD15)
    with pytest.raises(SageError) as err:
        search._resolve_target(imagenet_class_names())
    assert f"'{target}'" in str(err.value) and "model.init_args.target" in str(err.value)
    assert len(str(err.value).splitlines()) == 1
