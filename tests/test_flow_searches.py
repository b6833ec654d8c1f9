"""The searches on the tiny SD3 and FLUX (issue 23 items 3 and 4): latent search in process and from ``sage fit``
with configs/models/tiny_sd3.yaml; latent, prompt and universal-token search resumed after SIGKILL and on two DDP
processes, equal to one uninterrupted device (slow: ``pytest -m slow``). Slots in the CLIP and T5 streams:
tests/test_flow_slots.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import REPO, kill_after_first_checkpoint, model_args, results, sage
from safetensors.torch import load_file

from sage_lightning.datamodules import ClassPromptDataModule
from sage_lightning.errors import SageError
from sage_lightning.flow_models import FluxModel, SD3Model
from sage_lightning.flow_sampler import FlowSampler, sampler_for
from sage_lightning.models import load_diffusion
from sage_lightning.sampler import ResidualGradient
from sage_lightning.searches import LatentSearch
from sage_lightning.searches.settings import PAPER_ITERATIONS, default_max_iterations
from sage_lightning.text import XLConditioning


@pytest.mark.parametrize("source, record, hidden, branches", [("tiny-sd3", SD3Model, (1, 77 + 32, 80), 2),
                                                               ("tiny-flux", FluxModel, (1, 32, 32), 1)])
def test_latent_search_samples_with_the_flow_sampler_and_reaches_delta(source, record, hidden, branches):
    """SD3 at guidance 5 runs both CFG branches a step; FLUX's guidance is embedded (one call a step)."""
    guidance = 5.0 if record is SD3Model else 1.0
    search = LatentSearch(diffusion=source, scheduler="flow-euler", num_steps=2, guidance_scale=guidance)
    search.prepare(ClassPromptDataModule(classes=["star"]).targets)
    search.trainer = None
    assert isinstance(search.frozen.model, record) and isinstance(search.sampler, FlowSampler)
    assert search.max_iterations == 20 and search.latent_shape() == (4, 16, 16)  # a CPU world; the unpacked latent
    assert search.loop_length == 2 and search.cost.branches == search.sampler.cost.branches == branches
    cond = search.prompt_embeddings(["a photo of a star"])
    assert isinstance(cond, XLConditioning) and cond.hidden.shape == hidden
    z = search.initial_latents(torch.tensor([0])) + search.delta[:1]
    images = search.generate(z, cond, [0])
    assert images.shape == (1, 3, 32, 32)
    search.frozen.ensemble(images, search.class_index[:1]).loss.backward()
    assert search.delta.grad.abs().sum() > 0


def test_unet_schedulers_are_refused_on_flow_models_with_one_line():
    with pytest.raises(SageError, match="set model.init_args.scheduler to null or 'flow-euler'"):
        LatentSearch(diffusion="tiny-sd3", scheduler="ddim").prepare(ClassPromptDataModule(classes=["star"]).targets)


def test_sage_fit_runs_the_latent_search_on_tiny_sd3(tmp_path):
    run = tmp_path / "run"
    sage("fit", "--config", str(REPO / "configs" / "latent_search_tiny.yaml"),
         "--config", str(REPO / "configs" / "models" / "tiny_sd3.yaml"), "--trainer.default_root_dir", str(run),
         "--data.init_args.classes", "[star]", "--data.init_args.seeds_per_class", "2",
         "--model.init_args.num_steps", "2", "--model.init_args.max_iterations", "2")
    rows = results(run)
    assert len(rows) == 2 and all(r["class"] == "star" for r in rows)
    assert all((run / r["latent"]).exists() and (run / r["image"]).exists() for r in rows)
    assert all(r["iterations"] <= 2 for r in rows)


@pytest.mark.parametrize("group, source, guidance, tiny", [
    ("sd3", "stabilityai/stable-diffusion-3-medium-diffusers", 7.0, "tiny-sd3"),
    ("flux", "black-forest-labs/FLUX.1-dev", 3.5, "tiny-flux"),
])
def test_the_real_model_groups_compose_with_the_latent_search_and_run_on_the_tiny_stacks(group, source, guidance, tiny,
                                                                                      tmp_path):
    """configs/models/sd3.yaml and flux.yaml through the CLI: the pipelines' 28 steps and guidance in bfloat16,
    per-block and decoder checkpointing on the search's own gradient mode, the ImageNet ensemble, the paper's 100
    iterations; with the source and ensemble swapped for a tiny stack's, one iteration runs as configured."""
    args = model_args("latent_search.yaml", f"models/{group}.yaml")
    assert (args["diffusion"], args["scheduler"], args["num_steps"], args["guidance_scale"], args["dtype"]) == (
        source, "flow-euler", 28, guidance, "bfloat16")
    assert args["grad_mode"]["class_path"].endswith("ResidualGradient") and args["grad_mode"]["init_args"] == {
        "step": 0.5, "weight": 1.0, "checkpoint": True, "decoder_checkpoint": True}
    members = args["ensemble"]["init_args"]["members"]
    assert len(members) == 4 and members[0]["init_args"]["class_names"] == "imagenet"
    assert args["max_iterations"] is None and default_max_iterations(source) == PAPER_ITERATIONS == 100
    run = tmp_path / "run"
    sage("fit", "--config", str(REPO / "configs" / "latent_search.yaml"),
         "--config", str(REPO / "configs" / "models" / f"{group}.yaml"), "--trainer.default_root_dir", str(run),
         "--model.init_args.diffusion", tiny, "--model.init_args.ensemble", "null", "--data.init_args.classes",
         "[star]", "--data.init_args.seeds_per_class", "1", "--model.init_args.max_iterations", "1")
    (row,) = results(run)
    search = LatentSearch(**{**args, "diffusion": tiny, "ensemble": None, "grad_mode": ResidualGradient(
        0.5, 1.0, checkpoint=True, decoder_checkpoint=True)})
    assert row["iterations"] == 1 and row["forward_equivalents"] == search.forward_equivalents(1)
    assert search.cost.image() == 28 * (2 if group == "sd3" else 1) and search.cost.checkpoint


DATA = ["--data.init_args.classes", "[star, ring]", "--data.init_args.seeds_per_class", "2"]
SMALL = {  # each search's shortest run that still checkpoints mid-run (a pass, a word, a token step)
    "latent_search": [*DATA, "--model.init_args.num_steps", "3", "--model.init_args.max_iterations", "10"],
    "prompt_search": ["--data.init_args.classes", "[star, ring]", "--model.init_args.num_steps", "2",
                      "--model.init_args.max_words", "2", "--model.init_args.eval_seeds", "2"],
    "universal_token": ["--data.init_args.classes", "[ring, heart]", "--model.init_args.num_steps", "2",
                        "--model.init_args.max_iterations", "3", "--model.init_args.eval_batch_size", "1"],
}


def _args(group: str, run, *extra: str, search: str = "latent_search") -> list[str]:
    return ["fit", "--config", str(REPO / "configs" / f"{search}_tiny.yaml"),
            "--config", str(REPO / "configs" / "models" / f"{group}.yaml"), "--trainer.default_root_dir", str(run),
            *SMALL[search], *extra]


def _tensors(run) -> dict[str, dict[str, list]]:
    return {p.relative_to(run).as_posix(): {k: v.tolist() for k, v in load_file(p).items()}
            for p in sorted(run.rglob("*.safetensors"))}


SEARCHES = [(search, group) for search in SMALL for group in ("tiny_sd3", "tiny_flux")]


@pytest.mark.slow
@pytest.mark.parametrize("search, group", SEARCHES)
def test_resume_after_sigkill_equals_the_uninterrupted_run(search, group, tmp_path):
    reference, run = tmp_path / "reference", tmp_path / "run"
    sage(*_args(group, reference, search=search))
    kill_after_first_checkpoint(run, *_args(group, run, search=search))
    assert not (run / "summary.json").exists()
    sage("fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last")
    assert results(run) == results(reference) and _tensors(run) == _tensors(reference)


@pytest.mark.slow
@pytest.mark.parametrize("search, group", SEARCHES)
def test_ddp_on_two_cpu_processes_equals_one_device(search, group, tmp_path):
    """Two ranks of batch 1 equal one device whose batch is the global one (the universal token's step sign is
    the global batch's; the other searches' targets are independent, batch 1 on both sides)."""
    one = ["--data.init_args.batch_size", "2" if search == "universal_token" else "1"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    sage(*_args(group, single, *one, search=search))
    sage(*_args(group, ddp, "--data.init_args.batch_size", "1", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                search=search))
    assert results(ddp) == results(single) and _tensors(ddp) == _tensors(single)


COSTS = [("tiny-flux", 3.5, 1.0, 1), ("tiny-flux", 1.0, 1.0, 1), ("tiny-flux", 3.5, 2.0, 2), ("tiny-sd3", 5.0, 1.0, 2),
         ("tiny-sd3", 1.0, 1.0, 1), ("tiny", 7.5, 1.0, 2)]


@pytest.mark.parametrize("source, guidance, true_cfg, branches", COSTS)
def test_the_cost_counts_the_transformer_calls_a_step_makes(source, guidance, true_cfg, branches):
    """FLUX's guidance is an embedding inside one call, its true CFG a second call on the negative prompt; SD3 and
    the UNets run a negative branch when guided. The search's cost, before any weights load, equals the branch
    evaluations the sampler really runs for one image (an SD3 call on [negative; positive] counts 2)."""
    scheduler = "ddim" if source == "tiny" else "flow-euler"
    search = LatentSearch(diffusion=source, scheduler=scheduler, num_steps=4, guidance_scale=guidance,
                          true_cfg_scale=true_cfg)
    assert search.cost.branches == branches and search.cost.image() == 4 * branches
    search.prepare(ClassPromptDataModule(classes=["star"]).targets)
    search.trainer = None
    model = search.frozen.model
    network = getattr(model, "transformer", None) or model.unet
    rows = []
    network.register_forward_pre_hook(lambda _m, args, kwargs: rows.append(len((args or [kwargs["hidden_states"]])[0])),
                                      with_kwargs=True)
    with torch.no_grad():
        search.generate(search.initial_latents(torch.tensor([0])), search.prompt_embeddings(["a photo of a star"]))
    assert sum(rows) == search.cost.image() == search.sampler.cost.image()


def test_true_cfg_is_a_flux_setting_refused_elsewhere_in_one_line():
    with pytest.raises(SageError, match="true_cfg_scale=2.0 is FLUX's true classifier-free guidance"):
        LatentSearch(diffusion="tiny-sd3", scheduler="flow-euler", true_cfg_scale=2.0).cost.image()
    with pytest.raises(SageError, match="true_cfg_scale=2.0 is FLUX's true classifier-free guidance"):
        sampler_for(load_diffusion("tiny"), 4, 3.0, None, true_cfg_scale=2.0)
    with pytest.raises(SageError, match="true_cfg_scale=-1 must be in"):
        LatentSearch(diffusion="tiny-flux", true_cfg_scale=-1)
