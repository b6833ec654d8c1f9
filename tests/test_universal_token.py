"""Universal adversarial token on the tiny stack: the token alone changes, gradients reach it, the run folder,
the CLIP-score logger against torchmetrics, the token in a plain diffusers pipeline, SIGKILL resume, DDP."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from helpers import REPO, assert_fit_refused, kill_after_first_checkpoint, results, sage
from PIL import Image
from safetensors import safe_open
from torchmetrics.multimodal import CLIPScore

from sage_lightning.callbacks import ClipScoreLogger, TokenWriter
from sage_lightning.callbacks.clip_score import load_clip_for_score
from sage_lightning.cli import main
from sage_lightning.datamodules import PromptSetDataModule
from sage_lightning.errors import SageError
from sage_lightning.searches import UniversalTokenSearch
from sage_lightning.targets import Target
from sage_lightning.text import readable

TINY = REPO / "configs" / "universal_token_tiny.yaml"
CLASSES = ["ring", "heart", "circle"]


def _data(**kwargs) -> PromptSetDataModule:
    args = {"classes": CLASSES, "seeds_per_class": 2, "batch_size": 2, "held_out_templates": ["a drawing of a {}"]}
    return PromptSetDataModule(**{**args, **kwargs})


def _prepared(**kwargs) -> tuple[UniversalTokenSearch, PromptSetDataModule]:
    search = UniversalTokenSearch(target="star", diffusion="tiny", num_steps=2, max_iterations=1, **kwargs)
    data = _data()
    search.prepare(data.targets, data.held_out)
    return search, data


def _frozen_state(search: UniversalTokenSearch) -> dict[str, torch.Tensor]:
    modules = {"model": search.frozen.model.modules(), "ensemble": [search.frozen.ensemble]}
    return {
        f"{kind}{i}.{name}": t.detach().clone()
        for kind, mods in modules.items()
        for i, module in enumerate(mods)
        for name, t in module.state_dict().items()
    }


# ------------------------------------------------------------------------------------ prompt sets
def test_prompt_sets_hold_out_and_drop_the_target_class():
    search, data = _prepared()
    known = search.frozen.ensemble.class_names
    assert len(data.targets(known)) == 6 and len(search.targets) == 6
    assert [t.index for t in search.held_out] == [0, 1, 2]
    training = {(t.prompt, t.seed) for t in search.targets}
    assert not training & {(t.prompt, t.seed) for t in search.held_out}
    with_star = UniversalTokenSearch(target="star", diffusion="tiny", num_steps=2)
    star_data = _data(classes=["star", "ring"])
    with_star.prepare(star_data.targets, star_data.held_out)
    assert {t.class_name for t in with_star.targets} == {"ring"} == {t.class_name for t in with_star.held_out}
    assert [t.index for t in with_star.targets] == [0, 1]
    with pytest.raises(SageError, match="also a training prompt"):
        _data(held_out_templates=["a photo of a {}"], held_out_base_seed=0).held_out(known)


# ------------------------------------------------------------------------------------ the module
def test_default_gradient_is_exact_through_every_step():
    """METHOD.md: the token conditions every denoising step, so it takes the exact gradient (checkpointed), as
    configs/universal_token.yaml and the prompt search do; the residual shortcut is the latent search's device."""
    from sage_lightning.sampler import FullGradient, ResidualGradient

    assert UniversalTokenSearch(diffusion="tiny").grad_mode == FullGradient(checkpoint=True)
    given = ResidualGradient(0.5)
    assert UniversalTokenSearch(diffusion="tiny", grad_mode=given).grad_mode is given  # a config still chooses


def test_gradient_reaches_the_token_and_nothing_else():
    search, _ = _prepared()
    assert [n for n, p in search.named_parameters() if p.requires_grad] == ["token"]
    assert list(search.state_dict()) == ["token"] and tuple(search.token.shape) == (32,)
    search.token.data.normal_(generator=torch.Generator().manual_seed(0))
    loss = search.training_step(torch.tensor([0, 3]), 0)
    loss.backward()
    assert search.token.grad is not None and search.token.grad.abs().sum() > 0
    frozen = [p for m in search.frozen.model.modules() for p in m.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in frozen)
    search.token.grad = None
    ring = Target(0, "ring", "a photo of a ring", 0)
    (1 - search.text_similarity([ring])).sum().backward()  # the text term alone also reaches it
    assert search.token.grad.abs().sum() > 0


def test_training_changes_only_the_placeholder_embedding(tmp_path):
    search, data = _prepared()
    before, token_before = _frozen_state(search), search.token.detach().clone()
    trainer = L.Trainer(
        default_root_dir=str(tmp_path), max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[TokenWriter(judge=None)],
    )
    trainer.fit(search, datamodule=data)
    after = _frozen_state(search)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(search.token.detach(), token_before)
    assert int(search.iterations.min()) == 1 and trainer.global_step == 3  # one pass of 6 prompts, batch 2
    assert (tmp_path / "token.safetensors").is_file() and (tmp_path / "summary.json").is_file()


def test_a_non_finite_held_out_value_stops_the_run_naming_it():
    """The held-out rendering (CLIP score, writer) stops on a NaN probability or token, naming it, before anything
    uses it; under DDP every rank raises the same line (tests/test_reliability.py, the flag reduction)."""
    search, _ = _prepared()
    search.trainer = None
    ensemble = search.frozen.ensemble
    clean = ensemble.member_probs

    def poisoned(images):
        probs = clean(images).clone()
        probs[1, 0, :] = float("nan")
        return probs

    ensemble.member_probs = poisoned
    first = search.held_out[0]
    with pytest.raises(SageError, match=f"probability of held-out prompt {first.index} .'{first.prompt}', seed "
                                        f"{first.seed}. with the token is nan: the search diverged"):
        search.held_out_evaluation(True)
    del ensemble.member_probs
    with torch.no_grad():
        search.token[3] = float("inf")
    with pytest.raises(SageError, match="the token holds inf after 0 passes"):
        search.held_out_evaluation(True)
    assert search.held_out_evaluation(False).probs.isfinite().all()  # without the token: nothing to stop


def test_clamp_acts_on_the_token():
    from sage_lightning.callbacks import ClampPerturbation

    search, _ = _prepared()
    search.token.data.fill_(5.0)
    search.count_step(torch.tensor([0, 1]))
    ClampPerturbation(-2.5, 2.5).on_train_batch_end(None, search, None, None, 0)
    assert float(search.token.detach().max()) == 2.5


def test_shapesworld_clip_processor_follows_the_world_convention():
    from sage_lightning.shapesworld.shipped import SHAPESWORLD_DIR

    assert (SHAPESWORLD_DIR / "clip" / "config.json").exists(), "ShapesWorld's CLIP is not shipped"
    from sage_lightning.shapesworld.world import pixel_values

    _, processor = load_clip_for_score("shapesworld")
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    got = processor(images=list(images), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(got, pixel_values(images.float() / 255), atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> str:
    """A random tiny CLIP with its processor, saved as a user's local CLIP folder (any CLIP a config names)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from sage_lightning.models import clip_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                       "num_hidden_layers": 2, "image_size": 64, "patch_size": 16},
        projection_dim=16,
    )
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer()).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def config(tmp_path_factory, clip_dir) -> str:
    """The tiny config with the test CLIP, ShapesWorld's judge (exercised on noise), 3 passes of 3 steps."""
    cfg = yaml.safe_load(TINY.read_text())
    for callback in cfg["trainer"]["callbacks"]:
        if callback["class_path"] == "sage_lightning.callbacks.ClipScoreLogger":
            callback["init_args"] = {"model": clip_dir, "every_n_steps": 4}
        if callback["class_path"] == "sage_lightning.callbacks.TokenWriter":
            callback["init_args"]["judge"] = "shapesworld"
    cfg["model"]["init_args"]["max_iterations"] = 3
    cfg["model"]["init_args"]["eval_batch_size"] = 1  # held-out images then do not depend on how ranks split them
    path = tmp_path_factory.mktemp("cfg") / "universal_token_test.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, config) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    sage("fit", "--config", config, "--trainer.default_root_dir", str(run))
    return run


def _token(run: Path) -> tuple[torch.Tensor, dict[str, str]]:
    with safe_open(str(run / "token.safetensors"), "pt") as f:
        return f.get_tensor("embedding"), f.metadata()


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_run_folder_holds_every_output(reference_run):
    embedding, meta = _token(reference_run)
    assert embedding.shape == (32,) and embedding.abs().max() <= 2.5
    assert meta["placeholder"] == "<sage-star>" and meta["dimension"] == "32" and meta["target"] == "star"
    assert meta["text_encoder"] == "tiny:CLIPTextModel" and meta["slot"] == "[*]"
    rows = results(reference_run)
    assert [r["prompt"] for r in rows] == [f"a drawing of a {c}" for c in CLASSES]
    for r in rows:
        for side in ("with_token", "without_token"):
            assert (reference_run / r[side]["image"]).is_file()
            assert r[side]["judge_hit"] in (True, False)
    summary = _summary(reference_run)
    assert summary["steps"] == 9 and summary["passes"] == 3 and summary["held_out_prompts"] == 3
    assert summary["hit_rate_ensemble"]["with_token"] == sum(r["with_token"]["hit"] for r in rows) / 3
    assert set(summary["hit_rate_judge"]) == {"with_token", "without_token"}
    assert set(summary["clip_score"]) == {"with_token", "without_token"}
    grid = Image.open(reference_run / "grid.png")
    assert grid.size == (2 + 3 * 66, 2 + 2 * 66)  # 3 held-out prompts, without / with
    logged = (reference_run / "logs" / "version_0" / "metrics.csv").read_text()
    assert "clip_score/with_token" in logged and "loss" in logged


def _direct_clip_scores(run: Path, clip_dir: str) -> dict[str, float]:
    """torchmetrics' CLIPScore on the saved held-out images against their original prompts."""
    pair = load_clip_for_score(clip_dir)
    scores = {}
    for side in ("with_token", "without_token"):
        metric = CLIPScore(model_name_or_path=lambda: pair)
        rows = results(run)
        images = torch.stack([torch.from_numpy(np.array(Image.open(run / r[side]["image"]))).permute(2, 0, 1)
                              for r in rows])
        metric.update(images, [r["prompt"] for r in rows])
        scores[side] = float(metric.compute())
    return scores


def test_clip_score_logger_equals_torchmetrics_on_the_same_images(reference_run, clip_dir):
    logged = _summary(reference_run)["clip_score"]
    direct = _direct_clip_scores(reference_run, clip_dir)
    assert logged == pytest.approx(direct, abs=1e-4)


def test_saved_token_in_a_plain_diffusers_pipeline_reproduces_the_slot(reference_run, tiny_dir):
    """The README's 5-line snippet, run as written (paths replaced): add the placeholder to the tokenizer,
    resize the embeddings, set the row; the pipeline's images equal the search's images with the slot."""
    readme = (REPO / "README.md").read_text()
    snippet = readme.split("## Universal token", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert len(snippet.strip().splitlines()) == 5
    snippet = snippet.replace("sage_lightning/shapesworld/weights/pipeline", tiny_dir)
    snippet = snippet.replace("runs/universal_token/token.safetensors", str(reference_run / "token.safetensors"))
    namespace: dict = {}
    exec(snippet, namespace)
    pipe, e, tok = namespace["pipe"], namespace["e"], namespace["tok"]
    assert tok == "<sage-star>" and len(pipe.tokenizer) == 49409

    search, data = _prepared()
    search.num_steps = 3
    search.token.data.copy_(e)
    held_out = search.held_out
    ours = search.render(held_out, with_token=True)
    theirs = pipe(
        [f"{t.prompt} {tok}" for t in held_out], num_inference_steps=3, guidance_scale=3.0,
        latents=search.latents_of(held_out), output_type="pt",
    ).images
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    plain = search.render(held_out, with_token=False)
    assert (plain - ours).abs().max() > 1e-3  # the token does change the images
    saved = torch.stack([torch.from_numpy(np.array(Image.open(reference_run / r["with_token"]["image"])))
                         for r in results(reference_run)]).permute(0, 3, 1, 2)
    assert (saved.float() - theirs * 255).abs().max() <= 1.0  # the run's own images are these (PNG rounding)


def _assert_same_run(a: Path, b: Path) -> None:
    ea, eb = _token(a)[0], _token(b)[0]
    assert torch.equal(ea, eb)
    assert results(a) == results(b)
    sa, sb = _summary(a), _summary(b)
    clip_a, clip_b = sa.pop("clip_score"), sb.pop("clip_score")
    assert sa == sb
    assert clip_a == pytest.approx(clip_b, abs=1e-4)  # DDP sums per-rank partial sums: last-bit differences


def test_resume_after_sigkill_equals_uninterrupted_run(reference_run, config, tmp_path):
    run = tmp_path / "run"
    kill_after_first_checkpoint(run, "fit", "--config", config, "--trainer.default_root_dir", str(run))
    assert not (run / "token.safetensors").exists() and not (run / "summary.json").exists()
    sage("fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last")
    _assert_same_run(reference_run, run)


def test_ddp_on_two_cpu_processes_equals_one_device(reference_run, config, clip_dir, tmp_path):
    """2 ranks x batch 1 = the reference's global batch of 2; CLIP-score state synchronised by torchmetrics."""
    run = tmp_path / "ddp"
    sage(
        "fit", "--config", config, "--trainer.default_root_dir", str(run), "--trainer.devices", "2",
        "--trainer.strategy", "ddp", "--data.init_args.batch_size", "1",
    )
    _assert_same_run(reference_run, run)
    assert _summary(run)["clip_score"] == pytest.approx(_direct_clip_scores(run, clip_dir), abs=1e-4)


# ------------------------------------------------------------------------------- configs and errors
@pytest.mark.parametrize("name", ["universal_token.yaml", "universal_token_tiny.yaml"])
def test_configs_parse(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / name), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "sage_lightning.searches.UniversalTokenSearch"
    assert printed["data"]["class_path"] == "sage_lightning.datamodules.PromptSetDataModule"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--model.init_args.target", "stra"], "unknown class 'stra'"),
        (["--data.init_args.classes", "[star]"], "every prompt is of the target class"),
        (["--data.init_args.held_out_templates", "[a drawing]"], "must contain exactly one"),
        (["--model.init_args.init_word", "a photo"], "is 2 tokens"),
        (["--data", "sage_lightning.datamodules.ClassPromptDataModule"], "needs training and held-out prompts"),
    ],
)
def test_bad_input_is_one_clear_line(extra, needle, capsys, tmp_path):
    assert_fit_refused(TINY, tmp_path / "r", extra, needle, capsys)


def test_clip_logger_names_a_missing_model():
    with pytest.raises(SageError, match="cannot load CLIP model"):
        ClipScoreLogger(model="/no/such/clip").load()


def test_placement_before_class_slots_the_token_before_the_class_word_where_the_encoder_lets_it_act():
    """``placement: before_class`` writes "a photo of a [*] ring"; under CLIP's causal attention an appended token
    cannot change the class word's own state, one before it does (issue 20: benchmarks/word_position.py)."""
    ring = Target(0, "ring", "a photo of a ring", 0)
    end, _ = _prepared()
    before, _ = _prepared(placement="before_class")
    assert readable(end.with_slot(ring)) == "a photo of a ring [*]"
    assert readable(before.with_slot(ring)) == "a photo of a [*] ring"
    for search in (end, before):
        search.token.data.normal_(generator=torch.Generator().manual_seed(0))
    word = len(end.frozen.model.tokenizer("a photo of a ring").input_ids) - 2  # the class word (BOS ... ring EOS)
    plain = end.encode([ring], with_token=False)[0]
    appended, inserted = end.encode([ring], with_token=True)[0], before.encode([ring], with_token=True)[0]
    assert torch.allclose(appended[: word + 1], plain[: word + 1])  # the prompt's states, class word included
    assert torch.allclose(inserted[:word], plain[:word])  # before the slot nothing moves
    assert not torch.allclose(inserted[word + 1], plain[word], atol=1e-4)  # the class word's state, after the token
    assert TokenWriter.metadata(before)["placement"] == "before_class"
    with pytest.raises(SageError, match="no 'ring'"):
        before.with_slot(Target(0, "ring", "a photo of a donut", 0))
    star = Target(0, "star", "a star under a starry sky", 0)  # the class word as a word, not inside "starry"
    assert readable(before.with_slot(star)) == "a [*] star under a starry sky"
    with pytest.raises(SageError, match="no 'ring'"):
        before.with_slot(Target(0, "ring", "a photo of earrings", 0))
    with pytest.raises(SageError, match="placement='middle'"):
        UniversalTokenSearch(diffusion="tiny", placement="middle")
