"""Every shipped config parses through the CLI (class paths resolve, keys exist), alone or as groups."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sage_lightning.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
COMBOS = [
    ["latent_search.yaml"],
    ["latent_search_tiny.yaml"],
    ["latent_search.yaml", "random_latent.yaml"],
    ["latent_search.yaml", "random_perturbation.yaml"],
    ["universal_token.yaml", "random_token.yaml"],
    ["latent_search.yaml", "models/sd15.yaml", "trainer/gpu.yaml"],
    ["latent_search.yaml", "models/sd15.yaml", "models/sd21.yaml", "trainer/ddp_gpu.yaml"],
    ["latent_search.yaml", "trainer/ddp_cpu.yaml"],
    ["latent_search.yaml", "models/sdxl.yaml", "trainer/gpu.yaml"],
    ["latent_search_tiny.yaml", "models/tiny_xl.yaml"],
    ["latent_search_tiny.yaml", "models/tiny_sd3.yaml"],
    ["latent_search_tiny.yaml", "models/tiny_flux.yaml"],
    ["latent_search.yaml", "models/sd3.yaml", "trainer/gpu.yaml"],
    ["latent_search.yaml", "models/flux.yaml", "trainer/gpu.yaml"],
    ["prompt_search.yaml", "models/sd15.yaml"],
    ["prompt_search.yaml", "models/sd15.yaml", "models/gpt2_candidates.yaml"],
    ["universal_token.yaml", "models/sd15.yaml", "models/sd21.yaml"],
    ["universal_token.yaml", "models/sd15.yaml", "models/clip_score_l14.yaml"],
    ["prompt_search.yaml", "models/sdxl.yaml"],
    ["prompt_search.yaml", "models/sd3.yaml", "models/gpt2_candidates.yaml", "trainer/gpu.yaml"],
    ["universal_token.yaml", "models/flux.yaml", "models/clip_score_l14.yaml", "trainer/gpu.yaml"],
]


@pytest.mark.parametrize("files", COMBOS, ids=["+".join(c) for c in COMBOS])
def test_config_groups_parse(files, capsys):
    args = ["fit"] + [a for f in files for a in ("--config", str(CONFIGS / f))] + ["--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    last = yaml.safe_load((CONFIGS / files[-1]).read_text())
    if "model" in last and "class_path" in last["model"]:
        assert printed["model"]["class_path"] == last["model"]["class_path"]
    if files[-1] in ("random_perturbation.yaml", "random_token.yaml"):  # overlays: the base's model and callbacks stay
        base = yaml.safe_load((CONFIGS / files[0]).read_text())
        assert printed["model"]["init_args"]["diffusion"] == base["model"]["init_args"]["diffusion"]
        assert printed["model"]["init_args"]["num_steps"] == base["model"]["init_args"]["num_steps"]
        classes = [c["class_path"] for c in printed["trainer"]["callbacks"]]
        assert classes[: len(base["trainer"]["callbacks"])] == [c["class_path"] for c in base["trainer"]["callbacks"]]
    if len(files) > 1 and files[1].startswith("models/"):  # a model group keeps the search's gradient mode
        own = yaml.safe_load((CONFIGS / files[0]).read_text())["model"]["init_args"]["grad_mode"]
        grad = printed["model"]["init_args"]["grad_mode"]
        assert grad["class_path"] == own["class_path"], (files, grad)
        if files[1] in ("models/sd15.yaml", "models/sdxl.yaml", "models/sd3.yaml", "models/flux.yaml"):
            assert grad["init_args"]["checkpoint"] is True
    if files[1:2] == ["models/sd15.yaml"]:
        members = printed["model"]["init_args"]["ensemble"]["init_args"]["members"]
        assert [m["class_path"].rsplit(".", 1)[1] for m in members] == [
            "TimmMember", "TimmMember", "OpenClipZeroShotMember", "CannyEdgeMember"
        ]
        expected = "stabilityai/stable-diffusion-2-1" if "models/sd21.yaml" in files else "stable-diffusion-v1-5"
        assert expected in printed["model"]["init_args"]["diffusion"]
    if "models/clip_score_l14.yaml" in files:  # a real CLIP scores a real model, towards an ImageNet class
        callbacks = {c["class_path"].rsplit(".", 1)[1]: c["init_args"] for c in printed["trainer"]["callbacks"]}
        assert list(callbacks) == ["ClipScoreLogger", "TokenWriter"]  # the box is the search's own (issue 20)
        assert callbacks["ClipScoreLogger"]["model"] == "openai/clip-vit-large-patch14"
        assert callbacks["TokenWriter"]["judge"] is None
        assert printed["model"]["init_args"]["target"] in printed["data"]["init_args"]["classes"]


def test_all_configs_are_covered():
    shipped = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")}
    covered = {f for combo in COMBOS for f in combo} | {"trainer/cpu.yaml"}
    missing = {s for s in shipped - covered if s.startswith(("latent", "random", "models/", "trainer/"))}
    assert not missing, f"configs without a parse test: {sorted(missing)}"


def test_model_groups_leave_the_searchs_data_alone(capsys):
    """Issue 21 item 4: a model group sets model things (and the class list, in its ensemble's vocabulary), never
    the search's batch or seeds: the universal token on Stable Diffusion keeps its batch of several classes."""
    for group in sorted((CONFIGS / "models").glob("*.yaml")):
        data = (yaml.safe_load(group.read_text()) or {}).get("data") or {}
        assert set(data.get("init_args") or {}) <= {"classes"} and set(data) <= {"init_args"}, group.name
    files = ["universal_token.yaml", "models/sd15.yaml", "models/clip_score_l14.yaml"]
    with pytest.raises(SystemExit):
        main(["fit"] + [a for f in files for a in ("--config", str(CONFIGS / f))] + ["--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
    own = yaml.safe_load((CONFIGS / "universal_token.yaml").read_text())["data"]["init_args"]
    assert (printed["batch_size"], printed["seeds_per_class"]) == (own["batch_size"], own["seeds_per_class"]) == (4, 2)
