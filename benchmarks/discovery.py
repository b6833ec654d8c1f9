"""Discovery benchmark (issue 14): does SAGE find a failure near a latent the model gets right, better than chance?

For the same targets (class, seed z0, prompt) and the same compute per target, measured in
forward-equivalents (SAGE_METHOD.md: a UNet forward = 1, a backward = 2, a checkpointed recompute = 1 more;
``TargetSearch.forward_equivalents``), five searches run through the ``sage`` CLI (so the shipped configs
are what is measured):

* SAGE, residual gradient (``configs/latent_search.yaml``, ``ResidualGradient(0.5)``), ``--iterations N``:
  the budget B = its forward-equivalents for N iterations;
* SAGE, exact gradient through every step (``FullGradient``): as many iterations as fit in B;
* local random, uniform (``configs/random_perturbation.yaml``): delta uniform in SAGE's box around z0,
  under the same clamp and Gaussian-shell projection, as many draws as fit in B;
* local random, corners: random sign vectors at the box's corners, same constraints and draws;
* local random, sign walk: random sign steps of SAGE's own ``lr`` from z0, same clamp and projection, same
  draws (uniform draws land about 0.5 sqrt(d) from z0, SAGE's failures 0.2-0.3 sqrt(d): the walk stays at
  SAGE's distances, so it asks whether the gradient's direction matters);
* fresh seeds (``configs/random_latent.yaml``): new z ~ N(0, I), same draws.

Every search starts from the target's z0; every target has its own seed (``distinct_seeds``: 100 targets
hold 100 z0, from ``--base-seed``; the evaluation seeds start far from every seed training used). Targets
whose clean image (z0) already fails D, or that the judge already rejects, are reported apart and left out
of every rate. Per method, per class and overall, over the remaining targets:

* SSR(A): share of targets where D declared a failure within B;
* SSR(J): share where, in addition, ShapesWorld's geometric judge confirms it (it sees the class in the clean
  image and not in the final one); D-only failures (the judge still sees the class) are counted apart;
* median forward-equivalents per failure (over found targets);
* NGR: share of found latents that fail the KS or the chi-norm test (``sage_lightning.metrics.gaussianity``);

each with a 95% bootstrap interval over targets (percentile, ``--bootstrap`` resamples, fixed seed); then
each method's SSR(A) and SSR(J) minus local random uniform's on the same targets, with a paired bootstrap
interval: the direct answer to "better than chance?".

Smoke run (tiny random stack, about a minute on a quiet CPU; the numbers mean nothing)::

    python benchmarks/discovery.py --smoke

Full run (ShapesWorld; only once its world passes its gate)::

    python benchmarks/discovery.py --iterations 20 --seeds 10 --accelerator gpu --out runs/discovery

Each method's run folder stays under ``--out``; the table is also written to ``OUT/discovery.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import yaml
from discovery_stats import difference_table, paired_differences, summarise, table
from PIL import Image

from sage_lightning.cli import main as sage_main
from sage_lightning.metrics import CONFIRMED, D_ONLY, failure_kind
from sage_lightning.sampler import FullGradient, GradientMode, ResidualGradient
from sage_lightning.searches import LatentSearch, RandomLatentSearch

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "latent_search.yaml"
SMOKE = {"config": str(REPO / "configs" / "latent_search_tiny.yaml"), "classes": "star,ring", "seeds": 2,
         "iterations": 2, "bootstrap": 200}
BASELINE = "local random uniform"  # the chance level the paired differences are taken against


@dataclass
class Method:
    """One row group of the table: a search and how it is run."""

    name: str
    configs: list[str]  # after the base config
    args: dict[str, str] = field(default_factory=dict)
    grad_mode: GradientMode | None = None  # SAGE rows: what its forward-equivalents are counted with


def grad_mode_yaml(folder: Path, name: str, mode: GradientMode) -> str:
    """A config overlay that sets ``model.init_args.grad_mode`` (the CLI takes a class as a file best)."""
    init = dict(vars(mode))
    path = folder / f"grad_mode_{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"model": {"init_args": {"grad_mode": {
        "class_path": f"sage_lightning.sampler.{type(mode).__name__}", "init_args": init}}}}))
    return str(path)


def sampling(config: str, num_steps: int | None) -> dict:
    """The base config's model, scheduler, ``num_steps`` and ``guidance_scale``: the budget's inputs."""
    init = (yaml.safe_load(Path(config).read_text()).get("model") or {}).get("init_args") or {}
    return {"diffusion": init.get("diffusion", "shapesworld"), "scheduler": init.get("scheduler", "ddim"),
            "num_steps": num_steps or init.get("num_steps", 20), "guidance_scale": init.get("guidance_scale", 3.0)}


def plan(args: argparse.Namespace) -> tuple[list[Method], dict]:
    """The five methods with their iterations / draws, all within the residual SAGE run's budget B."""
    settings = sampling(args.config, args.num_steps)
    residual, full = ResidualGradient(0.5, 1.0), FullGradient(checkpoint=False)
    budget = LatentSearch(grad_mode=residual, **settings).forward_equivalents(args.iterations)
    full_search = LatentSearch(grad_mode=full, **settings)
    full_iterations = max(n for n in range(args.iterations + 1) if full_search.forward_equivalents(n) <= budget)
    draws = RandomLatentSearch(**settings).cost.draws_within(budget)
    overlays = Path(args.out) / "overlays"
    perturb = str(REPO / "configs" / "random_perturbation.yaml")
    random_args = {"--model.init_args.max_iterations": str(draws), "--model.init_args.match_sage_iterations": "null"}
    methods = [
        Method("SAGE residual", [grad_mode_yaml(overlays, "residual", residual)],
               {"--model.init_args.max_iterations": str(args.iterations)}, residual),
        Method("SAGE full gradient", [grad_mode_yaml(overlays, "full", full)],
               {"--model.init_args.max_iterations": str(full_iterations)}, full),
        Method("local random uniform", [perturb], {**random_args, "--model.init_args.mode": "uniform"}),
        Method("local random corners", [perturb], {**random_args, "--model.init_args.mode": "corners"}),
        Method("local random sign walk", [perturb], {**random_args, "--model.init_args.mode": "sign_walk"}),
        Method("fresh seeds", [str(REPO / "configs" / "random_latent.yaml")], random_args),
    ]
    info = {**settings, "budget_forward_equivalents": budget, "sage_iterations": args.iterations,
            "full_iterations": full_iterations, "draws": draws}
    return methods, info


def run_folder(method: Method, out: str) -> Path:
    return Path(out) / method.name.replace(" ", "_")


def overrides_of(method: Method, args: argparse.Namespace, run: Path) -> dict[str, str]:
    """The command-line settings of ``method``'s run: the plan (budget, targets, seeds) and where it writes."""
    overrides = {
        **method.args,
        "--model.init_args.num_steps": str(sampling(args.config, args.num_steps)["num_steps"]),
        "--data.init_args.classes": f"[{args.classes}]" if args.classes != "all" else "all",
        "--data.init_args.seeds_per_class": str(args.seeds),
        "--data.init_args.base_seed": str(args.base_seed),
        "--data.init_args.distinct_seeds": "true",
        "--trainer.accelerator": args.accelerator,
        "--trainer.default_root_dir": str(run),
        "--trainer.enable_progress_bar": "false",
    }
    if args.batch_size:
        overrides["--data.init_args.batch_size"] = str(args.batch_size)
    return overrides


PLAN_KEYS = ("--model.init_args.max_iterations", "--model.init_args.num_steps", "--model.init_args.mode",
             "--data.init_args.classes", "--data.init_args.seeds_per_class", "--data.init_args.base_seed",
             "--data.init_args.distinct_seeds")


def _plain(value: object) -> object:
    """A config value compared as text (a class list read back from YAML may hold names or indices)."""
    return [str(v) for v in value] if isinstance(value, list) else value


def plan_differences(run: Path, overrides: dict[str, str]) -> list[str]:
    """The plan settings where ``run``'s own config.yaml differs from ``overrides`` (empty when it matches):
    a kept run must have spent the budget the table reports, on the same targets."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    out = []
    for key in PLAN_KEYS:
        if key not in overrides:
            continue
        section, _, name = key.removeprefix("--").split(".")
        value = ((config.get(section) or {}).get("init_args") or {}).get(name)
        wanted = yaml.safe_load(overrides[key])
        if _plain(value) != _plain(wanted):
            out.append(f"{name} {value!r} (now {wanted!r})")
    return out


def run_method(method: Method, args: argparse.Namespace) -> tuple[Path, float]:
    """Run ``method`` into its folder under ``--out``. With ``--resume``, a finished run (summary.json) is kept
    and one with a checkpoint is resumed from it (bit-exact, README "Resume a killed search"), but only when its
    config holds the current plan (budget, targets, seeds); a run of another plan is refused with one line."""
    run = run_folder(method, args.out)
    overrides = overrides_of(method, args, run)
    start = time.perf_counter()
    if args.resume and (run / "config.yaml").exists():
        changed = plan_differences(run, overrides)
        if changed:
            raise SystemExit(f"discovery: error: --resume: {run} was run with another plan: {'; '.join(changed)}; "
                             "drop --resume to run it again, or give the plan it was run with")
    if args.resume and (run / "summary.json").exists():
        return run, 0.0
    if args.resume and (run / "checkpoints" / "last.ckpt").exists():
        sage_main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last"])
        return run, time.perf_counter() - start
    if run.exists():
        shutil.rmtree(run)
    configs = [x for c in [args.config, *method.configs] for x in ("--config", c)]
    sage_main(["fit", *configs, *[x for kv in overrides.items() for x in kv]])
    return run, time.perf_counter() - start


def judge_verdicts(run: Path, rows: list[dict]) -> dict[int, tuple[str | None, str | None]]:
    """ShapesWorld's geometric judge on each target's saved clean and final images: ``(clean, final)`` shapes."""
    from sage_lightning.shapesworld.judge import judge_shapes

    if not rows:
        return {}
    clean = judge_shapes(np.stack([np.asarray(Image.open(run / r["clean_image"]).convert("RGB")) for r in rows]))
    final = judge_shapes(np.stack([np.asarray(Image.open(run / r["image"]).convert("RGB")) for r in rows]))
    return {r["target"]: (c, f) for r, c, f in zip(rows, clean, final, strict=True)}


def outcomes(method: Method, run: Path, settings: dict, judge: bool) -> dict[int, dict]:
    """Per target: class, found at iteration 0 (already failing), already failing for the judge, found,
    judge-confirmed, D-only, cost, outlier.

    The judge looks at the saved images again (the run's own ``clean_judge``/``final_judge`` were written by
    the judge of that day). The cost is the record's own ``forward_equivalents`` (the search's count); runs
    written before records carried it are costed here with the same :meth:`forward_equivalents`."""
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines() if line.strip()]
    cost = (LatentSearch(grad_mode=method.grad_mode, **settings) if method.grad_mode else
            RandomLatentSearch(**settings)).forward_equivalents
    verdicts = judge_verdicts(run, rows) if judge else {}
    out = {}
    for r in rows:
        kind = failure_kind(r["class"], *verdicts[r["target"]]) if judge and r["found"] else None
        out[r["target"]] = {
            "class": r["class"], "already": r["found"] and r["iterations"] == 0, "found": r["found"],
            "judge_already": verdicts[r["target"]][0] != r["class"] if judge else False,
            "confirmed": kind == CONFIRMED if judge else None, "d_only": kind == D_ONLY if judge else None,
            "cost": r.get("forward_equivalents", cost(r["iterations"])), "outlier": r["ngr"]["outlier"],
        }
    return out


def world_stages() -> dict:
    path = REPO / "sage_lightning" / "shapesworld" / "weights" / "world.json"
    return json.loads(path.read_text()).get("stages", {}) if path.exists() else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny random stack, 2 classes x 2 seeds, N=2 (~1 min)")
    parser.add_argument("--config", default=str(CONFIG), help="base latent-search config (clamp, projection, model)")
    parser.add_argument("--classes", default="all", help="comma-separated classes, or 'all'")
    parser.add_argument("--seeds", type=int, default=10, help="targets per class (each its own seed)")
    parser.add_argument("--base-seed", type=int, default=9_000_000,
                        help="first seed (targets take base-seed, base-seed + 1, ...); evaluation seeds start far "
                             "from every seed training used (D's hard examples: 5,000,000)")
    parser.add_argument("--iterations", type=int, default=20, help="SAGE residual iterations N: the budget B")
    parser.add_argument("--num-steps", type=int, default=None, help="denoising steps (default: the config's)")
    parser.add_argument("--batch-size", type=int, default=None, help="targets per step (default: the config's)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples over targets")
    parser.add_argument("--no-judge", action="store_true", help="skip ShapesWorld's judge (SSR(J) n/a)")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--out", default="runs/discovery")
    parser.add_argument("--methods", default="all",
                        help="comma-separated run folder names (SAGE_residual, SAGE_full_gradient, "
                             "local_random_uniform, local_random_corners, local_random_sign_walk, fresh_seeds), "
                             "or 'all'")
    parser.add_argument("--resume", action="store_true",
                        help="keep finished methods' runs, resume killed ones from their checkpoint "
                             "(several processes may each run some --methods into the same --out)")
    args = parser.parse_args()
    if args.smoke:
        for key, value in SMOKE.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)

    methods, info = plan(args)
    if args.methods != "all":
        known = {run_folder(m, "").name: m for m in methods}
        wanted = [name.strip() for name in args.methods.split(",")]
        unknown = [name for name in wanted if name not in known]
        if unknown:
            parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
        methods = [known[name] for name in wanted]
    settings = {k: info[k] for k in ("diffusion", "scheduler", "num_steps", "guidance_scale")}
    results, seconds = {}, {}
    for method in methods:
        run, seconds[method.name] = run_method(method, args)
        results[method.name] = outcomes(method, run, settings, judge=not args.no_judge)
    rows, already = summarise(results, args.bootstrap, seed=0)

    stages = ", ".join(f"{k} {v.get('steps', '?')} steps" for k, v in sorted(world_stages().items()))
    print(f"\n{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {args.accelerator}; ShapesWorld stages: {stages or 'n/a'}")
    print(f"config {args.config}; classes {args.classes}, {args.seeds} seeds each; {info['num_steps']} steps, "
          f"guidance {info['guidance_scale']}; budget B = {info['budget_forward_equivalents']:,} forward-equivalents "
          f"per target = SAGE residual {info['sage_iterations']} iterations = SAGE full {info['full_iterations']} "
          f"iterations (or fewer) = z0 + {info['draws']} random draws")
    total = len(next(iter(results.values())))
    print(f"targets: {total}; already failing at z0 for D or the judge (left out of every rate): {len(already)} "
          f"{already}; "
          f"minutes per method: " + ", ".join(f"{k} {v / 60:.1f}" for k, v in seconds.items()) + "\n")
    print(table(rows))
    differences = paired_differences(results, already, BASELINE, args.bootstrap, seed=0) if BASELINE in results else []
    if differences:
        print("\nPaired differences over the same targets (95% paired bootstrap; pp = percentage points):\n")
        print(difference_table(differences))
    out = Path(args.out) / "discovery.json"
    out.write_text(json.dumps({"args": vars(args), "plan": info, "already_failing": already, "rows": rows,
                               "differences": differences, "seconds": seconds}, indent=2) + "\n")


if __name__ == "__main__":
    main()
