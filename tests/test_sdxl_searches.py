"""The three SAGE searches on the tiny SDXL (issue 13), from ``sage fit`` with configs/models/tiny_xl.yaml:
end to end in float32 and bfloat16, resume after SIGKILL, DDP on two CPU processes; and the SDXL configs.

Kept small (few targets, steps and iterations), yet each run is a fresh process of one to several minutes on a
shared 2-core CPU: only the float32 latent run is in the default set; the rest are marked slow (``pytest -m slow
tests/test_sdxl_searches.py``; all passed in 19 minutes on that CPU).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import REPO, kill_after_first_checkpoint, model_args, results, sage
from safetensors.torch import load_file

from sage_lightning.candidates import WordListCandidates
from sage_lightning.datamodules import ClassPromptDataModule
from sage_lightning.errors import SageError
from sage_lightning.searches import LatentSearch, PromptSearch, UniversalTokenSearch
from sage_lightning.targets import Target
from sage_lightning.text import XLConditioning

CONFIGS = REPO / "configs"
XL = str(CONFIGS / "models" / "tiny_xl.yaml")
SMALL = {  # the *_tiny configs, cut down further: the tiny SDXL is slower than the tiny SD
    "latent_search": ["--data.init_args.classes", "[star, ring]", "--data.init_args.seeds_per_class", "1",
                      "--model.init_args.num_steps", "3"],
    "prompt_search": ["--data.init_args.classes", "[star]", "--model.init_args.max_words", "1",
                      "--model.init_args.eval_seeds", "2", "--model.init_args.num_steps", "2"],
    "universal_token": ["--model.init_args.max_iterations", "1", "--data.init_args.classes", "[ring, heart]",
                        "--data.init_args.seeds_per_class", "1", "--model.init_args.num_steps", "2"],
}


def fit(search: str, run: Path, *extra: str) -> Path:
    sage("fit", "--config", str(CONFIGS / f"{search}_tiny.yaml"), "--config", XL,
         "--trainer.default_root_dir", str(run), *SMALL[search], *extra)
    return run


def tensors(run: Path) -> dict[str, dict[str, list]]:
    return {p.relative_to(run).as_posix(): {k: v.tolist() for k, v in load_file(p).items()}
            for p in sorted(run.rglob("*.safetensors"))}


# ------------------------------------------------------------------------------------- in process
def test_the_searches_take_both_encoders_and_the_pipelines_unconditional_branch():
    latent = LatentSearch(diffusion="tiny-xl", num_steps=2, scheduler="euler", max_iterations=1)
    latent.prepare(ClassPromptDataModule(classes=["star"]).targets)
    latent.trainer = None
    assert latent.max_iterations == 1 and LatentSearch(diffusion="tiny-xl").max_iterations == 20  # a CPU world
    cond = latent.prompt_embeddings(["a photo of a star"])
    assert isinstance(cond, XLConditioning) and latent.unconditional_embeddings().hidden.abs().sum() == 0
    z = latent.initial_latents(torch.tensor([0])) + latent.delta[:1]
    latent.frozen.ensemble(latent.generate(z, cond, [0]), latent.class_index[:1]).loss.backward()
    assert latent.delta.grad.abs().sum() > 0

    prompt = PromptSearch(candidates=WordListCandidates(["red", "blue"]), diffusion="tiny-xl", num_steps=2,
                          judge=None)
    prompt.prepare(ClassPromptDataModule(classes=["star"]).targets)
    assert tuple(prompt.slots.shape) == (1, 2, 64)  # [x], [y]: one 32 + 32 vector per slot (both tables)
    words, embeddings = prompt.proposals(0)
    assert words and embeddings.shape == (len(words), 64)
    prompt.trainer = None
    cond = prompt.frozen.encoder([prompt.slotted_prompt(0)], {"x": prompt.slots[:1, 0], "y": prompt.slots[:1, 1]})
    images = prompt.generate(prompt.step_latents([0]), cond, prompt.step_seeds([0]))
    prompt.frozen.ensemble(images, prompt.class_index[:1]).loss.backward()
    for k in range(2):  # [x] and [y]: each encoder's 32 entries of each slot reach the image
        assert prompt.slots.grad[0, k, :32].abs().sum() > 0 and prompt.slots.grad[0, k, 32:].abs().sum() > 0

    token = UniversalTokenSearch(target="star", diffusion="tiny-xl", init_word="red", num_steps=2)
    from sage_lightning.datamodules import PromptSetDataModule

    token.prepare(PromptSetDataModule(classes=["ring"], held_out_templates=["a drawing of a {}"]).targets)
    red = token.frozen.encoder.word_ids("red")
    assert torch.equal(token.token.data, token.frozen.encoder.embedding_rows(red)[0].float())
    similarity = token.text_similarity([Target(0, "ring", "a photo of a ring", 0)])
    similarity.sum().backward()
    assert token.token.grad[:32].abs().sum() > 0 and token.token.grad[32:].abs().sum() > 0


def test_micro_conditioning_from_the_config_reaches_the_unet_and_is_checked():
    """``micro_conditioning`` (SDXL's add_time_ids) set in the search's config is what the sampler feeds the UNet,
    and changes the image; bad keys, values and non-SDXL models are one-line errors."""
    size = {"original_size": [32, 48], "crops_coords_top_left": [4, 8], "target_size": [64, 96]}
    searches = [LatentSearch(diffusion="tiny-xl", num_steps=2, max_iterations=1, micro_conditioning=m)
                for m in (size, None)]
    for search in searches:
        search.prepare(ClassPromptDataModule(classes=["star"]).targets)
        search.trainer = None
    moved, default = searches
    assert moved.frozen.model.add_time_ids().tolist() == [[32, 48, 4, 8, 64, 96]]
    assert default.frozen.model.add_time_ids().tolist() == [[64, 64, 0, 0, 64, 64]]  # the image size
    z = moved.initial_latents(torch.tensor([0]))
    cond = moved.prompt_embeddings(["a photo of a star"])
    with torch.no_grad():
        assert (moved.generate(z, cond, [0]) - default.generate(z, cond, [0])).abs().max() > 1e-4

    for bad, needle in [({"orig_size": [1, 1]}, "no key 'orig_size'"),
                        ({"target_size": [1024]}, "micro_conditioning.target_size=[1024]"),
                        ({"original_size": [-1, 5]}, "two non-negative integers")]:
        with pytest.raises(SageError, match=re.escape(needle)):
            LatentSearch(diffusion="tiny-xl", micro_conditioning=bad)
    plain = LatentSearch(diffusion="tiny", micro_conditioning={"target_size": [64, 64]})
    with pytest.raises(SageError, match="'tiny' is not an SDXL model"):
        plain.prepare(ClassPromptDataModule(classes=["star"]).targets)


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize(
    ("search", "dtype"),
    [("latent_search", "float32"), *(pytest.param(*case, marks=pytest.mark.slow) for case in
                                      [("latent_search", "bfloat16"), ("prompt_search", "float32"),
                                       ("universal_token", "bfloat16")])],
)
def test_each_search_runs_on_tiny_xl_from_sage_fit(search, dtype, tmp_path):
    run = fit(search, tmp_path / "run", "--model.init_args.dtype", dtype)
    config = yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]
    assert config["diffusion"] == "tiny-xl" and config["scheduler"] == "euler" and config["dtype"] == dtype
    summary = json.loads((run / "summary.json").read_text())
    rows = results(run)
    assert rows
    if search != "universal_token":  # every target finished and is counted once
        assert summary["finished"] == summary["targets"] == len(rows) and summary["unfinished"] == 0
    for row in rows:
        for key in ("image", "clean_image", "grid"):
            if isinstance(row.get(key), str):
                assert (run / row[key]).is_file()
    if search == "latent_search":
        check_latent_run(run, rows, dtype)
    if search == "universal_token":
        from safetensors import safe_open

        with safe_open(run / "token.safetensors", "pt") as f:
            assert f.get_tensor("embedding").shape == (64,)
            meta = f.metadata()
        assert meta["text_encoder"] == "tiny-xl:CLIPTextModel+CLIPTextModelWithProjection" and meta["widths"] == "32,32"


def check_latent_run(run: Path, rows: list[dict], dtype: str) -> None:
    """What the latent search did on the tiny SDXL: z0 is its seed's latent, the search moved z within the clamp's
    box, every line records the cost model's cost, and (float32) the final image is z's image."""
    from PIL import Image

    from sage_lightning.results import to_uint8
    from sage_lightning.targets import seeded_latent

    assert any(row["iterations"] > 0 for row in rows)  # something was searched
    search = None
    for row in rows:
        i = row["iterations"]
        # 3 euler steps, guided: an image is 3 x 2 = 6 forwards; the residual at 0.5 of 3 steps keeps a graph from
        # step floor(1.5) = 1: a backward is 2 steps x 2 branches = 4 calls, 2 FE (8) or 1 UE (4) each
        assert row["forward_equivalents"] == (i + 1) * 6 + i * 8
        assert row["unet_evaluations"] == (i + 1) * 6 + i * 4
        saved = load_file(run / row["latent"])
        z, z0 = saved["z"], saved["z0"]
        assert torch.equal(z0, seeded_latent(row["seed"], tuple(z0.shape)))  # reproducible from the seed
        delta = (z - z0).abs().max()
        assert delta <= 1.0 + 1e-5 and (i == 0 or delta > 0)  # in the box [-1, 1]; moved when stepped
        if dtype != "float32":
            continue
        if search is None:
            search = LatentSearch(diffusion="tiny-xl", num_steps=3, scheduler="euler", max_iterations=1)
            search.prepare(ClassPromptDataModule(classes=["star"]).targets)
            search.trainer = None
        with torch.no_grad():
            image = search.generate(z[None], search.prompt_embeddings([row["prompt"]]), [row["seed"]])[0]
        final = torch.from_numpy(np.asarray(Image.open(run / row["image"]).convert("RGB"))).int()
        assert (torch.from_numpy(to_uint8(image)).int() - final).abs().max() <= 1  # z's image, up to rounding


@pytest.mark.slow
def test_latent_search_resume_after_sigkill_equals_the_uninterrupted_run(tmp_path):
    longer = ["--model.init_args.max_iterations", "4"]
    reference = fit("latent_search", tmp_path / "reference", *longer)
    run = tmp_path / "run"
    kill_after_first_checkpoint(run, "fit", "--config", str(CONFIGS / "latent_search_tiny.yaml"), "--config", XL,
                                "--trainer.default_root_dir", str(run), *SMALL["latent_search"], *longer)
    assert not (run / "summary.json").exists()
    sage("fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last")
    assert results(run) == results(reference) and tensors(run) == tensors(reference)


@pytest.mark.slow
def test_latent_search_ddp_on_two_cpu_processes_equals_one_device(tmp_path):
    one = ["--data.init_args.batch_size", "1"]
    single = fit("latent_search", tmp_path / "single", *one)
    ddp = fit("latent_search", tmp_path / "ddp", *one, "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert results(ddp) == results(single) and tensors(ddp) == tensors(single)


# ------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize(
    ("search", "mode"),
    [("latent_search", "ResidualGradient"), ("prompt_search", "FullGradient"), ("universal_token", "FullGradient")],
)
def test_sdxl_config_checkpoints_every_step_and_the_decoder_and_keeps_each_searchs_gradient(search, mode):
    args = model_args(f"{search}.yaml", "models/sdxl.yaml")
    assert args["diffusion"] == "stabilityai/stable-diffusion-xl-base-1.0"
    sampling = (args["scheduler"], args["num_steps"], args["guidance_scale"], args["dtype"])
    assert sampling == ("euler", 50, 5.0, "float16")
    assert args["grad_mode"]["class_path"].endswith(mode)
    assert args["grad_mode"]["init_args"]["checkpoint"] and args["grad_mode"]["init_args"]["decoder_checkpoint"]
    assert "ensemble" in args
