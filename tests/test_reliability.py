"""Reliability of the ``sage`` command (issue 11): kills at any moment resume to the uninterrupted run, nothing
non-finite is written, a run that does not start leaves nothing behind, errors are one line, DDP ranks exit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import ENV, REPO, assert_fit_refused, error_of, results, sage
from safetensors.torch import load_file

from sage_lightning.candidates import WordListCandidates
from sage_lightning.datamodules import ClassPromptDataModule
from sage_lightning.errors import SageError
from sage_lightning.optim import SignSGD
from sage_lightning.results import RunFolder
from sage_lightning.searches import LatentSearch, PromptSearch, UniversalTokenSearch
from sage_lightning.surrogate import EnsembleOutput

CONFIGS = REPO / "configs"
TINY = {name: str(CONFIGS / f"{name}_tiny.yaml") for name in ("latent_search", "prompt_search", "universal_token")}
KILL = [sys.executable, str(REPO / "tests" / "killpoints.py")]


def killed_at(point: str, *args: str) -> None:
    """Run ``sage ARGS`` under tests/killpoints.py; it must die by SIGKILL at ``point``."""
    proc = subprocess.run([*KILL, point, *args], capture_output=True, text=True, env=ENV, cwd=REPO)
    assert proc.returncode == -9, f"not killed at {point} (exit {proc.returncode}): {proc.stderr[-2000:]}"


def strict_lines(run: Path) -> list[dict]:
    """``results.jsonl`` parsed as strict JSON (NaN and Infinity are refused)."""
    def refuse(value: str):
        raise AssertionError(f"results.jsonl holds {value}")

    return [json.loads(line, parse_constant=refuse) for line in (run / "results.jsonl").read_text().splitlines()]


def outputs(run: Path) -> dict:
    """What a finished run leaves, comparable between runs (results, summary, tensors)."""
    tensors = {p.relative_to(run).as_posix(): load_file(p) for p in sorted(run.rglob("*.safetensors"))}
    return {
        "results": results(run),
        "summary": json.loads((run / "summary.json").read_text()),
        "tensors": {k: {n: t.tolist() for n, t in v.items()} for k, v in tensors.items()},
    }


# ------------------------------------------------------------------- 1. kills at any moment resume
# The first kill lands before the first checkpoint (for the class-prompt searches after their first result
# line: the window that used to leave a folder neither resumable nor restartable); the resume is killed again
# after its last checkpoint, as summary.json is due; a second resume finishes. Mid-pass kills: the searches'
# own test files.
KILLS = [("latent_search", "first_result"), ("prompt_search", "first_result"), ("universal_token", "first_checkpoint")]


@pytest.mark.parametrize(("search", "first"), KILLS, ids=[s for s, _ in KILLS])
def test_sigkill_before_first_checkpoint_and_before_summary_resumes_to_the_uninterrupted_run(search, first, tmp_path):
    reference, run = tmp_path / "reference", tmp_path / "run"
    sage("fit", "--config", TINY[search], "--trainer.default_root_dir", str(reference))
    killed_at(first, "fit", "--config", TINY[search], "--trainer.default_root_dir", str(run))
    assert not (run / "checkpoints" / "last.ckpt").exists()
    if first == "first_result":
        assert strict_lines(run), "the kill came before any result line"
    killed_at("before_summary", "fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last")
    assert (run / "checkpoints" / "last.ckpt").exists() and not (run / "summary.json").exists()
    sage("fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last")
    assert outputs(run) == outputs(reference)


def test_a_restart_that_keeps_result_lines_runs_the_config_that_wrote_them(capsys, tmp_path):
    """``--ckpt_path last`` on a run killed before its first checkpoint starts again and keeps the result lines
    already written: only with the config.yaml that wrote them; another config is refused in one line naming the
    first differing key and the fix, and the folder is left as it was."""
    run = tmp_path / "run"
    base = ["--config", TINY["latent_search"], "--data.init_args.classes", "[star]", "--data.init_args.seeds_per_class",
            "1", "--model.init_args.max_iterations", "1", "--trainer.default_root_dir", str(run)]
    sage("fit", *base)
    shutil.rmtree(run / "checkpoints")  # as a run killed after its result lines, before its first checkpoint
    (run / "summary.json").unlink()
    lines = (run / "results.jsonl").read_text()
    for extra, key in [(["--model.init_args.max_iterations", "2"], "model.init_args.max_iterations"),
                       (["--data.init_args.base_seed", "5"], "data.init_args.base_seed"),
                       (["--trainer.callbacks", "[]"], "trainer.callbacks")]:
        err = error_of(["fit", *base, *extra, "--ckpt_path", "last"], capsys)
        assert err.startswith(f"sage: error: run folder '{run}' holds results of another config ({key}: "), err
        assert f"sage fit --config {run / 'config.yaml'} --ckpt_path last" in err and len(err.splitlines()) == 1
    assert (run / "results.jsonl").read_text() == lines and not (run / "checkpoints").exists()
    sage("fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last")  # its own config: runs again, finishes
    assert (run / "summary.json").is_file() and (run / "results.jsonl").read_text() == lines


def test_mid_pass_kill_point_lands_inside_a_pass(tmp_path):
    """The driver's ``mid_pass`` point: one step after the first checkpoint, which is still in the folder."""
    run = tmp_path / "run"
    killed_at("mid_pass", "fit", "--config", TINY["latent_search"], "--trainer.default_root_dir", str(run))
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 0 and not (run / "summary.json").exists()


# ------------------------------------------------------------------------- 2. nothing non-finite
def _latent(**kwargs) -> LatentSearch:
    search = LatentSearch(diffusion="tiny", num_steps=2, max_iterations=2, **kwargs)
    search.prepare(ClassPromptDataModule(classes=["star", "ring"]).targets)
    return search


@pytest.mark.parametrize("name", ["latent", "loss", "probability"])
def test_a_non_finite_value_stops_the_step_naming_value_target_and_iteration(name):
    search = _latent()
    search.iterations[1] = 2
    ids = torch.tensor([0, 1])
    latents = torch.zeros(2, 4, 32, 32)
    output = EnsembleOutput(
        loss=torch.tensor(0.0), per_sample_loss=torch.zeros(2), probs=torch.full((3, 2), 0.5),
        topk=torch.zeros(3, 2, 1, dtype=torch.long), failed=torch.zeros(2, dtype=torch.bool),
    )
    {"latent": latents[1, 0], "loss": output.per_sample_loss[1:], "probability": output.probs[2, 1:]}[name].fill_(
        float("nan")
    )
    with pytest.raises(SageError, match=f"the {name} of target 1 is nan at iteration 2"):
        search.advance(ids, torch.zeros(2, 3, 32, 32), latents, output)
    assert int(search.iterations[1]) == 2  # nothing advanced


def test_a_non_finite_probability_of_an_evaluated_prompt_stops_before_it_is_recorded():
    from sage_lightning.searches.prompt import PromptEvaluation

    search = PromptSearch(candidates=WordListCandidates(["red"]), diffusion="tiny", num_steps=2, eval_seeds=3)
    search.prepare(ClassPromptDataModule(classes=["star"]).targets)
    probs = torch.full((3, 3), 0.5)
    probs[1, 2] = float("inf")
    evaluation = PromptEvaluation(0, "a photo of a star red", 1, torch.zeros(3, 3, 8, 8), torch.zeros(3).bool(), probs,
                                  None)
    with pytest.raises(SageError, match="probability of prompt 'a photo of a star red' .target 0. is not finite"):
        search.conclude({0: ("red", evaluation, 6)})
    assert search.words[0] == [] and search.last[0] is None


def test_non_finite_gradient_and_result_are_refused(tmp_path):
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, float("nan"), -1.0])
    with pytest.raises(SageError, match="gradient holds nan at optimizer step 1"):
        SignSGD([p], lr=0.1).step()
    assert torch.equal(p.detach(), torch.zeros(3))
    run = RunFolder(tmp_path)
    run.append_results([{"target": 0, "loss": 1.0}])
    with pytest.raises(SageError, match="target 1 holds a non-finite value"):
        run.append_results([{"target": 1, "loss": float("inf")}])
    assert strict_lines(tmp_path) == [{"target": 0, "loss": 1.0}]


class PoisonAfterFirstStep(L.Callback):
    """Test callback: the rows stepped first (targets 0, 1) become NaN (a diverged search)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 1:
            with torch.no_grad():
                pl_module.adversarial_rows()[pl_module.stepped_targets] = float("nan")


def test_a_diverged_search_stops_with_one_line_and_results_stay_strict_json(capsys, tmp_path):
    run = tmp_path / "run"
    err = error_of(
        ["fit", "--config", TINY["latent_search"], "--trainer.default_root_dir", str(run),
         "--trainer.callbacks+=test_reliability.PoisonAfterFirstStep"], capsys,
    )
    assert err.startswith("sage: error: the latent of target 0 is nan at iteration 1: the search diverged"), err
    assert len(err.splitlines()) == 1
    assert [r["target"] for r in strict_lines(run)] == [2, 3]  # what finished before, and nothing after


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--model.init_args.guidance_scale", "1e38"], "guidance_scale=1e+38 must be in [0, 100]"),
        (["--model.init_args.guidance_scale", "nan"], "guidance_scale"),
        (["--model.init_args.true_cfg_scale", "-2"], "true_cfg_scale=-2.0 must be in [0, 100]"),
        (["--model.init_args.lr", "1e39"], "lr=1e+39 must be > 0 and at most 10"),
        (["--model.init_args.lr", "inf"], "lr"),
        (["--trainer.callbacks",
          '[{"class_path": "sage_lightning.callbacks.ClampPerturbation", "init_args": {"low": -1e30}}]'],
         "clamp range [-1e+30, 1.0] is too wide"),
    ],
)
def test_unreasonable_magnitudes_are_refused_up_front(extra, needle, capsys, tmp_path):
    assert_fit_refused(TINY["latent_search"], tmp_path / "run", extra, needle, capsys)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------- 3, 5, 7. a run that does not start
@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--data.init_args.classes", "[stra]"], "unknown class 'stra'"),
        (["--model.init_args.diffusion", "./no/such/model"], "does not exist"),
        (["--model.init_args.no_such_key", "1"], "Option 'no_such_key' is not accepted"),
        (["--model", "no.such.Search"], "No module named 'no'"),
        (["--config", "/no/such/config.yaml"], "File does not exist: '/no/such/config.yaml'"),
        (["--data.init_args.classes", "[" + "x" * 10_000 + "]"], "characters) no close match"),
    ],
)
def test_a_failed_start_is_one_short_line_and_leaves_no_folder(extra, needle, capsys, tmp_path):
    for run in (tmp_path / "new", tmp_path / "empty"):
        if run.name == "empty":
            run.mkdir()
        err = error_of(["fit", "--config", TINY["latent_search"], "--trainer.default_root_dir", str(run), *extra],
                       capsys)
        assert err.startswith("sage: error:") and needle in err, err
        assert len(err.splitlines()) == 1 and len(err) < 400, err
        assert not run.exists() if run.name == "new" else not any(run.iterdir())  # no config.yaml, no logs/


@pytest.mark.parametrize(
    "extra", [["--data.init_args.classes", "[stra]"], ["--model.init_args.diffusion", "./no/such/model"]],
    ids=["class", "model_folder"],
)
def test_a_user_mistake_found_after_the_trainer_is_built_prints_its_one_line_alone(extra, tmp_path):
    """The real command: Lightning's lines (seed set, GPU available, tips) are held until the run starts, so a
    mistake found at set-up leaves stderr one line and stdout empty."""
    proc = sage("fit", "--config", TINY["latent_search"], "--trainer.default_root_dir", str(tmp_path / "run"), *extra,
                check=False)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("sage: error:"), proc.stderr


def test_malformed_yaml_and_unusable_run_folder_are_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    err = error_of(["fit", "--config", TINY["latent_search"], "--config", str(bad)], capsys)
    assert err.startswith("sage: error: Problems parsing config") and len(err.splitlines()) == 1, err
    afile = tmp_path / "afile"
    afile.write_text("x")
    err = error_of(["fit", "--config", TINY["latent_search"], "--trainer.default_root_dir", str(afile / "run")],
                   capsys)
    assert err == f"sage: error: run folder '{afile / 'run'}' cannot be created: '{afile}' is a file; choose " \
                  "another --trainer.default_root_dir"


# ------------------------------------------------------------------- 4. another search's checkpoint
def _three_searches() -> dict[str, L.LightningModule]:
    """The three searches prepared on the same targets (ring, heart; the token targets star)."""
    data = ClassPromptDataModule(classes=["ring", "heart"])
    common = {"diffusion": "tiny", "num_steps": 2}
    searches = {
        "latent": LatentSearch(**common),
        "prompt": PromptSearch(candidates=WordListCandidates(["red", "blue"]), eval_seeds=3, **common),
        "token": UniversalTokenSearch(target="star", **common),
    }
    for search in searches.values():
        search.prepare(data.targets)
    return searches


def test_resuming_another_searchs_checkpoint_is_refused_in_every_direction():
    searches = _three_searches()
    checkpoints = {}
    for name, search in searches.items():
        checkpoints[name] = {"state_dict": search.state_dict()}
        search.on_save_checkpoint(checkpoints[name])
    for made_by, checkpoint in checkpoints.items():
        for name, search in searches.items():
            if name == made_by:
                search.on_load_checkpoint(checkpoint)  # its own: accepted
                continue
            with pytest.raises(SageError, match=f"made by {type(searches[made_by]).__name__}, this config runs"):
                search.on_load_checkpoint(checkpoint)


def test_failed_resume_is_one_line_and_adds_nothing_to_the_run_folder(capsys, tmp_path):
    run = tmp_path / "prompt"
    sage("fit", "--config", TINY["prompt_search"], "--trainer.default_root_dir", str(run),
         "--model.init_args.max_words", "1")
    before = sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))
    config = (run / "config.yaml").read_text()
    err = error_of(  # a latent config with the prompt run's targets
        ["fit", "--config", TINY["latent_search"], "--data.init_args.seeds_per_class", "1",
         "--trainer.default_root_dir", str(run), "--ckpt_path", "last"], capsys,
    )
    assert err.startswith("sage: error: the checkpoint was made by PromptSearch, this config runs LatentSearch")
    assert len(err.splitlines()) == 1
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == before  # no logs/version_1
    assert (run / "config.yaml").read_text() == config


# ------------------------------------------------------------------------- 6. copied run folders
def test_a_copied_run_folder_resumes_itself_and_leaves_the_original_alone(tmp_path):
    original = tmp_path / "original"
    sage("fit", "--config", TINY["latent_search"], "--trainer.default_root_dir", str(original),
         "--model.init_args.max_iterations", "1")
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    (copy / "summary.json").unlink()
    stamp = {p: p.stat().st_mtime_ns for p in original.rglob("*")}
    sage("fit", "--config", str(copy / "config.yaml"), "--ckpt_path", "last")
    assert {p: p.stat().st_mtime_ns for p in original.rglob("*")} == stamp
    assert (copy / "summary.json").read_text() == (original / "summary.json").read_text()


# ------------------------------------------------------------------------------------ 8. DDP ranks
def _ranks_alive(marker: str) -> list[int]:
    """Processes whose command line names ``marker`` (the run folder of a finished command)."""
    alive = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                alive.append(int(proc.name))
        except OSError:
            continue
    return alive


def test_await_ranks_returns_after_every_launched_rank_exited():
    from types import SimpleNamespace

    from sage_lightning.fit_session import FitSession

    rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    session = FitSession(trainer=SimpleNamespace(strategy=SimpleNamespace(launcher=SimpleNamespace(procs=[rank]))))
    started = time.time()
    session.await_ranks()
    assert rank.poll() == 0 and time.time() - started > 1.0


def test_ddp_user_error_is_one_line_from_rank_zero_and_leaves_nothing(tmp_path):
    run = tmp_path / "ddp"
    proc = sage("fit", "--config", TINY["latent_search"], "--trainer.default_root_dir", str(run), "--trainer.devices",
                "2", "--trainer.strategy", "ddp", "--data.init_args.classes", "[stra]", check=False)
    errors = proc.stderr.splitlines()  # the one line alone: no rank's Lightning lines before it
    assert proc.returncode == 2 and len(errors) == 1 and "unknown class 'stra'" in errors[0], proc.stderr[-2000:]
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr and not run.exists() and _ranks_alive(str(run)) == []


RANK_CASES = [["", "the probability of held-out prompt 3 is nan"], ["the loss of target 0 is inf", "other"], ["", ""]]


def _rank_stops(rank: int, folder: str) -> None:
    """One rank of a 2-process gloo group: each case of RANK_CASES through raise_on_every_rank."""
    import datetime

    from sage_lightning.searches.base import raise_on_every_rank

    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=60))
    messages = []
    for problems in RANK_CASES:
        try:
            raise_on_every_rank(problems[rank])
            messages.append("went on")
        except SageError as err:
            messages.append(str(err))
    torch.distributed.destroy_process_group()
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(messages))


def test_a_non_finite_value_on_one_rank_stops_every_rank_with_the_same_line(tmp_path):
    """The flag reduction behind stop_if_not_finite and the universal token's held-out check, on a real 2-process
    gloo group: a problem on any rank (here rank 1 alone) makes every rank raise the same line, none go on."""
    from sage_lightning.searches.base import DIVERGED

    torch.multiprocessing.spawn(_rank_stops, args=(str(tmp_path),), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    expected = [f"{next(p for p in case if p)}{DIVERGED}" if any(case) else "went on" for case in RANK_CASES]
    assert ranks[0] == ranks[1] == expected


@pytest.mark.parametrize("targets", [3, 5])
def test_ddp_with_uneven_targets_equals_one_device_and_returns_after_every_rank(targets, tmp_path):
    args = ["--config", TINY["latent_search"], "--data.init_args.classes", "[star]", "--data.init_args.seeds_per_class",
            str(targets), "--data.init_args.batch_size", "1", "--model.init_args.max_iterations", "2"]
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    sage("fit", *args, "--trainer.default_root_dir", str(ddp), "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert _ranks_alive(str(ddp)) == []
    sage("fit", *args, "--trainer.default_root_dir", str(single))
    assert [r["target"] for r in results(ddp)] == list(range(targets))
    assert outputs(ddp) == outputs(single)
