"""Benchmark: universal adversarial token on ShapesWorld, 3 target shapes (issue 6).

For each target shape, trains one token with ``configs/universal_token.yaml`` (through the ``sage`` CLI,
so the shipped config is what is measured) and prints, on the held-out prompts (templates and seeds that
the optimisation never sees; prompts of the target shape itself excluded):

* hit rate with the token, confirmed by ShapesWorld's geometric judge (judge says: the target shape);
* the same without the token: the base rate;
* the same two by the ensemble D (every member's top-1 is the target);
* CLIP score (ShapesWorld's CLIP, torchmetrics ``CLIPScore``) of the images against the ORIGINAL prompts,
  with and without the token.
* with ``--random-tokens K`` (default 3): the same hit rates for K random tokens of the trained token's norm
  on the same held-out prompts and seeds (``configs/random_token.yaml``): the chance level (issue 14).

Examples::

    python benchmarks/universal_token.py                                    # star, heart, cross
    python benchmarks/universal_token.py --targets star --passes 2 --num-steps 10 --out runs/bench_ut
    python benchmarks/universal_token.py --accelerator gpu --passes 10
    python benchmarks/universal_token.py --config configs/universal_token_tiny.yaml --targets star --passes 1

Each target's run folder (token, grid, results, summary; ``random_token_K/``) stays under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from sage_lightning.cli import main as sage_main

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "universal_token.yaml"


def run_target(target: str, args: argparse.Namespace) -> dict:
    """Train one token towards ``target`` with the config and return its ``summary.json`` (plus time)."""
    run = Path(args.out) / target
    if run.exists():
        shutil.rmtree(run)
    overrides = {
        "--model.init_args.target": target,
        "--model.init_args.max_iterations": args.passes,
        "--model.init_args.num_steps": args.num_steps,
        "--model.init_args.lr": args.lr,
        "--model.init_args.text_weight": args.text_weight,
        "--data.init_args.seeds_per_class": args.seeds,
        "--data.init_args.held_out_seeds_per_class": args.held_out_seeds,
        "--data.init_args.batch_size": args.batch_size,
        "--trainer.accelerator": args.accelerator,
        "--trainer.default_root_dir": str(run),
        "--trainer.enable_progress_bar": "false",
    }
    unet_steps = world_stages().get("unet", {}).get("steps")  # the world may still be training: say which UNet
    start = time.perf_counter()
    sage_main(["fit", "--config", args.config, *[str(x) for kv in overrides.items() for x in kv]])
    summary = json.loads((run / "summary.json").read_text())
    summary["seconds"] = time.perf_counter() - start
    summary["run"] = str(run)
    summary["unet_steps"] = unet_steps
    summary["random"] = [random_token(run, seed, overrides, args) for seed in range(args.random_tokens)]
    return summary


def random_token(run: Path, seed: int, overrides: dict, args: argparse.Namespace) -> dict:
    """Issue 14's chance level: a random token of the trained token's norm on the same held-out prompts and
    seeds (``configs/random_token.yaml``, nothing optimised); returns its ``summary.json``."""
    folder = run / f"random_token_{seed}"
    extra = {**overrides, "--trainer.default_root_dir": str(folder), "--model.init_args.draw_seed": seed,
             "--model.init_args.reference": str(run / "token.safetensors")}
    sage_main(["fit", "--config", args.config, "--config", str(REPO / "configs" / "random_token.yaml"),
               *[str(x) for kv in extra.items() for x in kv]])
    return json.loads((folder / "summary.json").read_text())


def world_stages() -> dict:
    path = REPO / "sage_lightning" / "shapesworld" / "weights" / "world.json"
    return json.loads(path.read_text()).get("stages", {}) if path.exists() else {}


def table(rows: list[dict]) -> str:
    def pct(x) -> str:
        return "n/a" if x is None else f"{100 * x:.0f}%"

    def clip(s: dict | None, side: str) -> str:
        return "n/a" if s is None else f"{s[side]:.2f}"

    def random(r: dict, key: str) -> str:  # mean hit rate of the random tokens of the same norm, and their spread
        rates = [(x[key] or {}).get("with_token") for x in r["random"]]
        rates = [x for x in rates if x is not None]
        return "n/a" if not rates else f"{pct(sum(rates) / len(rates))} ({pct(min(rates))}-{pct(max(rates))})"

    lines = [
        "| target | held-out prompts | hit, judge, with token | base rate, judge, without | hit, judge, random "
        "token (same norm) | hit, D, with | base, D, without | hit, D, random token | CLIP with | CLIP without | "
        "steps | minutes | UNet training steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        judge = r["hit_rate_judge"] or {"with_token": None, "without_token": None}
        lines.append(
            f"| {r['target_class']} | {r['held_out_prompts']} | {pct(judge['with_token'])} | "
            f"{pct(judge['without_token'])} | {random(r, 'hit_rate_judge')} | "
            f"{pct(r['hit_rate_ensemble']['with_token'])} | {pct(r['hit_rate_ensemble']['without_token'])} | "
            f"{random(r, 'hit_rate_ensemble')} | {clip(r['clip_score'], 'with_token')} | "
            f"{clip(r['clip_score'], 'without_token')} | {r['steps']} | {r['seconds'] / 60:.1f} | {r['unet_steps']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="star,heart,cross", help="comma-separated ShapesWorld shapes")
    parser.add_argument("--passes", type=int, default=5, help="passes over the training prompts")
    parser.add_argument("--num-steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--seeds", type=int, default=2, help="training seeds per (class, template)")
    parser.add_argument("--held-out-seeds", type=int, default=2, help="held-out seeds per (class, template)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--text-weight", type=float, default=0.1)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--out", default="runs/bench_universal_token")
    parser.add_argument("--config", default=str(CONFIG), help="e.g. configs/universal_token_tiny.yaml (smoke run)")
    parser.add_argument("--random-tokens", type=int, default=3,
                        help="random tokens of the trained token's norm per target (issue 14's chance level)")
    args = parser.parse_args()

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    rows = [run_target(t.strip(), args) for t in args.targets.split(",") if t.strip()]
    print(f"\n{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {args.accelerator}; ShapesWorld stages: "
          + ", ".join(f"{k} {v.get('steps', '?')} steps" for k, v in sorted(world_stages().items())))
    print(f"config {args.config}: {args.passes} passes, {args.num_steps} denoising steps, "
          f"lr {args.lr}, lambda {args.text_weight}, batch {args.batch_size}, seeds {args.seeds} "
          f"(held-out {args.held_out_seeds})\n")
    print(table(rows))


if __name__ == "__main__":
    main()
