"""Benchmark: prompt-space SAGE against random words, on ShapesWorld's classes (issue 5).

Runs ``sage fit --config configs/prompt_search.yaml`` (SAGE: L words of K sign steps, S-seed majority rule)
and the random-word baseline (``configs/prompt_random.yaml``: random whole words from the same candidate
source, the same S seeds and rule, at the same forward-equivalent budget), one target per class, then prints:

* the share of classes with a failing natural prompt (at least one appended word) found by D, and the
  share also confirmed by ShapesWorld's geometric judge (a strict majority of the S images both failing D
  and judged not to show the class);
* classes whose bare template already fails (reported apart and left out of the two shares above);
* the median cost per found failure, in forward-equivalents (a UNet forward = 1, a backward = 2, a
  checkpointed recompute = 1 more: sign steps and prompt evaluations), and the median number of words.

Examples::

    python benchmarks/prompt_search.py                                  # ShapesWorld, all 10 classes
    python benchmarks/prompt_search.py --diffusion tiny --num-steps 4   # the random debug stack (smoke)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def run_sage(out: Path, configs: list[str], overrides: list[str], threads: int) -> float:
    """One ``sage fit`` into ``out`` (skipped when it already finished there); returns its wall time."""
    if (out / "summary.json").exists():
        return float("nan")
    args = [a for c in configs for a in ("--config", str(CONFIGS / c))]
    resume = ["--ckpt_path", "last"] if (out / "checkpoints" / "last.ckpt").exists() else []
    cmd = [sys.executable, "-m", "sage_lightning.cli", "fit", *args, "--trainer.default_root_dir", str(out),
           "--trainer.enable_progress_bar", "false", *overrides, *resume]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    print("$", " ".join(cmd[2:]), file=sys.stderr, flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"run failed:\n{proc.stderr[-3000:]}")
    summary = [line for line in proc.stdout.splitlines() if " summary: " in line]
    print(*summary[-1:], file=sys.stderr, flush=True)  # the run's one-line summary
    return time.perf_counter() - started


def snapshot_world(out: Path) -> Path:
    """Copy the shipped ShapesWorld pipeline and classifiers into ``out/world`` (training may re-export them
    while the benchmark runs, and both methods must see the same world); returns a config that uses the
    copy with the ensemble ``default_ensemble("shapesworld")`` builds."""
    from sage_lightning.shapesworld.classifiers import NAMES
    from sage_lightning.shapesworld.plugin import SHAPESWORLD_VIEWS
    from sage_lightning.shapesworld.shipped import SHAPESWORLD_DIR

    snap = out / "world"
    if not snap.exists():
        tmp = out / "world.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for part in ("pipeline", "classifiers"):
            shutil.copytree(SHAPESWORLD_DIR / part, tmp / part)
        shutil.copy(SHAPESWORLD_DIR / "world.json", tmp / "world.json")
        tmp.rename(snap)
    members = []
    for path in [snap / "classifiers" / name / "config.json" for name in NAMES]:  # D's member order
        cfg = json.loads(path.read_text())
        member = {"class_path": "sage_lightning.surrogate.TimmMember", "init_args": {
            "model_name": cfg["model_name"], "class_names": cfg["class_names"],
            "checkpoint_path": str(path.parent / "model.safetensors"), "model_kwargs": cfg.get("model_kwargs"),
            "reject_names": cfg.get("reject_names")}}
        if cfg.get("input") == "canny":  # as shipped.shapesworld_member builds it
            canny = cfg["canny"]
            member = {"class_path": "sage_lightning.surrogate.CannyEdgeMember", "init_args": {
                "classifier": member, "low_threshold": canny["low_threshold"],
                "high_threshold": canny["high_threshold"], "l2_gradient": canny["l2_gradient"],
                "black_on_white": canny["black_on_white"],
                "stretch_contrast": canny.get("stretch_contrast", False)}}
        members.append(member)
    ensemble = {"class_path": "sage_lightning.surrogate.ClassifierEnsemble",
                "init_args": {"members": members, "views": list(SHAPESWORLD_VIEWS)}}
    config = snap / "model.yaml"
    config.write_text(json.dumps({"model": {"init_args": {"diffusion": str(snap / "pipeline"), "ensemble": ensemble}}}))
    return config


def read(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]


def row(name: str, rows: list[dict], seconds: float) -> list[str]:
    """One table row, counted per target (a class and seed; one per class unless ``--seeds-per-class`` says more)."""
    targets = sorted({r["target"] for r in rows})
    template = {r["target"] for r in rows if r["reason"] == "template fails"}
    found = [r for r in rows if r["found"] and r["words"]]
    found_targets = {r["target"] for r in found}
    confirmed = {r["target"] for r in found if r["judge"] and r["judge"]["confirmed"]}
    judged = any(r["judge"] for r in rows)
    n = len(targets)
    m = n - len(template)  # SSR leaves out the targets whose template already fails (README, "What a run writes")
    cost = statistics.median(r["forward_equivalents"] for r in found) if found else None
    words = statistics.median(len(r["words"]) for r in found) if found else None
    return [
        name, str(n), f"{len(template)}/{n}", f"{len(found_targets)}/{m} ({len(found_targets) / max(m, 1):.0%})",
        f"{len(confirmed)}/{m} ({len(confirmed) / max(m, 1):.0%})" if judged else "no judge",
        "-" if cost is None else f"{cost:,.0f}", "-" if words is None else f"{words:g}",
        f"{max(r['forward_equivalents'] for r in rows):,}", "-" if seconds != seconds else f"{seconds:.0f}",
    ]


def examples(rows: list[dict], k: int = 5) -> list[str]:
    out = []
    for r in [r for r in rows if r["found"] and r["words"]][:k]:
        shapes = ", ".join(str(s) for s in r["judge"]["shapes"]) if r["judge"] else "-"
        out.append(f"- {r['class']}: \"{r['prompt']}\" (D: {r['failed_seeds']}/{len(r['decisions'])} seeds fail;"
                   f" judge sees: {shapes})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--diffusion", default="shapesworld", help="model source (default shapesworld)")
    parser.add_argument("--classes", default="all", help="class list for data.classes (default all)")
    parser.add_argument("--seeds-per-class", type=int, default=1, help="targets per class (default 1)")
    parser.add_argument("--base-seed", type=int, default=0,
                        help="first target seed (default 0; every target its own seed from here)")
    parser.add_argument("--max-words", type=int, default=4, help="L (default 4)")
    parser.add_argument("--steps-per-word", type=int, default=10, help="K (default 10)")
    parser.add_argument("--eval-seeds", type=int, default=8, help="S (default 8)")
    parser.add_argument("--num-steps", type=int, default=20, help="DDIM steps (default 20)")
    parser.add_argument("--batch-size", type=int, default=5, help="targets per step (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: faster on a loaded CPU)")
    parser.add_argument("--out", default="runs/bench_prompt_search", help="folder of the two runs")
    args = parser.parse_args(argv)

    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    world = [] if args.diffusion != "shapesworld" else [str(snapshot_world(out))]
    source = [] if world else ["--model.init_args.diffusion", args.diffusion]
    common = [
        *source, "--model.init_args.num_steps", str(args.num_steps),
        "--model.init_args.max_words", str(args.max_words), "--model.init_args.eval_seeds", str(args.eval_seeds),
        "--model.init_args.judge", "shapesworld", "--data.init_args.classes", args.classes,
        "--data.init_args.seeds_per_class", str(args.seeds_per_class),
        "--data.init_args.batch_size", str(args.batch_size),
    ]
    if args.seeds_per_class > 1 or args.base_seed:  # every target its own seed (the default run keeps seed 0 per class)
        common += ["--data.init_args.base_seed", str(args.base_seed), "--data.init_args.distinct_seeds", "true"]
    k = ["--model.init_args.steps_per_word", str(args.steps_per_word)]
    t_sage = run_sage(out / "sage", ["prompt_search.yaml", *world], common + k, args.threads)
    match = ["--model.init_args.match_sage_steps_per_word", str(args.steps_per_word)]
    t_rand = run_sage(out / "random", ["prompt_search.yaml", *world, "prompt_random.yaml"], common + match,
                      args.threads)

    head = ["method", "targets", "template already fails", "failing prompt found (D)", "confirmed by judge",
            "median forward-eq. / found failure", "median words", "budget / class (forward-eq.)", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    sage_rows, rand_rows = read(out / "sage"), read(out / "random")
    lines.append("| " + " | ".join(row(f"SAGE prompt search (L={args.max_words}, K={args.steps_per_word})",
                                        sage_rows, t_sage)) + " |")
    lines.append("| " + " | ".join(row("random words, same budget", rand_rows, t_rand)) + " |")
    shipped = out / "world" / "world.json" if world else REPO / "sage_lightning/shapesworld/weights/world.json"
    stages = json.loads(shipped.read_text()).get("stages", {}) if shipped.exists() else {}
    given = argv if argv is not None else sys.argv[1:]
    print(f"Command: `python {' '.join(['benchmarks/prompt_search.py', *given])}`")
    print(f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; model {args.diffusion}; S={args.eval_seeds} seeds "
          f"(strict majority); DDIM {args.num_steps} steps; {os.cpu_count()} CPUs, {args.threads} threads; "
          f"ShapesWorld stages in world.json: {', '.join(sorted(stages)) or 'none'}")
    if world:
        print(f"World snapshot: {out / 'world'}; unet stage record: {json.dumps(stages.get('unet'))}")
    members = sorted(sage_rows[0]["probs"]) if sage_rows and sage_rows[0]["probs"] else []
    print(f"Ensemble D: {', '.join(members)}")
    print()
    print("\n".join(lines))
    for name, rows in (("SAGE", sage_rows), ("random", rand_rows)):
        found = examples(rows)
        if found:
            print(f"\n{name} failing prompts (first {len(found)}):")
            print("\n".join(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
