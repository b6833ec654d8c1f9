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
* the obvious baseline (issue 20): the target's own word instead of the token (its embedding through the same
  slot, where the config's ``placement`` puts it; nothing optimised), with its hit rates, CLIP score and text
  similarity.
* text similarity: mean ``cos(text(p + e), text(p))`` over the held-out prompts (pooled text features).

Examples::

    python benchmarks/universal_token.py                                    # star, triangle, crescent
    python benchmarks/universal_token.py --targets star --passes 2 --num-steps 10 --out runs/bench_ut
    python benchmarks/universal_token.py --accelerator gpu --passes 10
    python benchmarks/universal_token.py --config configs/universal_token_tiny.yaml --targets star --passes 1
    python benchmarks/universal_token.py --set loss=paper --set step_units=absolute --lr 0.05   # an ablation

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
        "--model.init_args.text_weight": args.text_weight,
        "--data.init_args.seeds_per_class": args.seeds,
        "--data.init_args.held_out_seeds_per_class": args.held_out_seeds,
        "--data.init_args.batch_size": args.batch_size,
        "--trainer.accelerator": args.accelerator,
        "--trainer.default_root_dir": str(run),
        "--trainer.enable_progress_bar": "false",
        **({"--model.init_args.lr": args.lr} if args.lr is not None else {}),
        **{f"--model.init_args.{k}": v for k, v in (item.split("=", 1) for item in args.set)},
    }
    unet_steps = world_stages().get("unet", {}).get("steps")  # the world may still be training: say which UNet
    start = time.perf_counter()
    sage_main(["fit", "--config", args.config, *[str(x) for kv in overrides.items() for x in kv]])
    summary = json.loads((run / "summary.json").read_text())
    summary["seconds"] = time.perf_counter() - start
    summary["run"] = str(run)
    summary["unet_steps"] = unet_steps
    summary["random"] = [random_token(run, seed, overrides, args) for seed in range(args.random_tokens)]
    summary["word"] = target_word(run, target, overrides, args) if args.target_word else None
    return summary


def target_word(run: Path, target: str, overrides: dict, args: argparse.Namespace) -> dict:
    """Issue 20's obvious baseline: the target's own word appended through the slot (``init: word``, no
    optimisation) on the same held-out prompts and seeds; returns its ``summary.json``."""
    folder = run / "target_word"
    extra = {**overrides, "--trainer.default_root_dir": str(folder), "--model.init_args.max_iterations": 0,
             "--model.init_args.init": "word", "--model.init_args.init_word": target}
    sage_main(["fit", "--config", args.config, *[str(x) for kv in extra.items() for x in kv]])
    return json.loads((folder / "summary.json").read_text())


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

    def judged(r: dict | None) -> float | None:
        return None if r is None or r.get("hit_rate_judge") is None else r["hit_rate_judge"]["with_token"]

    def clip_change(r: dict | None) -> str:
        s = None if r is None else r.get("clip_score")
        return "n/a" if s is None else f"{s['with_token'] - s['without_token']:+.2f}"

    def sim(r: dict | None) -> str:
        return "n/a" if r is None or r.get("text_similarity") is None else f"{r['text_similarity']:.3f}"

    def random(r: dict, key: str) -> str:  # mean hit rate of the random tokens of the same norm, and their spread
        rates = [(x[key] or {}).get("with_token") for x in r["random"]]
        rates = [x for x in rates if x is not None]
        return "n/a" if not rates else f"{pct(sum(rates) / len(rates))} ({pct(min(rates))}-{pct(max(rates))})"

    lines = [
        "| target | held-out prompts | hit, judge: token | random tokens, same norm | target word | base (no token) | "
        "hit, D: token | random | word | CLIP change: token | word | text sim.: token | word | token norm | steps "
        "| minutes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        judge = r["hit_rate_judge"] or {"with_token": None, "without_token": None}
        word = r.get("word")
        lines.append(
            f"| {r['target_class']} | {r['held_out_prompts']} | {pct(judge['with_token'])} | "
            f"{random(r, 'hit_rate_judge')} | {pct(judged(word))} | {pct(judge['without_token'])} | "
            f"{pct(r['hit_rate_ensemble']['with_token'])} | {random(r, 'hit_rate_ensemble')} | "
            f"{pct(None if word is None else word['hit_rate_ensemble']['with_token'])} | {clip_change(r)} | "
            f"{clip_change(word)} | {sim(r)} | {sim(word)} | {r['token_norm']:.3f} | {r['steps']} | "
            f"{r['seconds'] / 60:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="star,triangle,crescent", help="comma-separated ShapesWorld shapes")
    parser.add_argument("--passes", type=int, default=5, help="passes over the training prompts")
    parser.add_argument("--num-steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--seeds", type=int, default=2, help="training seeds per (class, template)")
    parser.add_argument("--held-out-seeds", type=int, default=2, help="held-out seeds per (class, template)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=None, help="the config's when left out (its step_units)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="another model.init_args value, e.g. loss=paper, init=random_row, box=norm")
    parser.add_argument("--no-target-word", dest="target_word", action="store_false",
                        help="skip the target-word baseline")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--text-weight", type=float, default=0.1)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--out", default="runs/bench_universal_token")
    parser.add_argument("--config", default=str(CONFIG), help="e.g. configs/universal_token_tiny.yaml (smoke run)")
    parser.add_argument("--random-tokens", type=int, default=3,
                        help="random tokens of the trained token's norm per target (issue 14's chance level)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    rows = [run_target(t.strip(), args) for t in args.targets.split(",") if t.strip()]
    print(f"\n{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {args.accelerator}; ShapesWorld stages: "
          + ", ".join(f"{k} {v.get('steps', '?')} steps" for k, v in sorted(world_stages().items())))
    print(f"config {args.config}: {args.passes} passes, {args.num_steps} denoising steps, "
          f"lr {args.lr or 'of the config'}, {', '.join(args.set) or 'config values'}, lambda {args.text_weight}, "
          f"batch {args.batch_size}, seeds {args.seeds} "
          f"(held-out {args.held_out_seeds})\n")
    print(table(rows))
    (Path(args.out) / "rows.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
