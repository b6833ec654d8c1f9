"""Benchmark: could random restarts pay for the universal token? (issue 20, "random restarts if they pay")

A restart pays only if some starting point lies in a better basin than the one the search starts from. This
probe trains nothing: for ``--starts K`` starting points of each random rule (``random_row``, ``mean_noise``;
seeds 0..K-1, the rules the search draws its start with), it renders the training prompts of
``configs/universal_token.yaml`` (the target's own prompts dropped) with the token appended and prints the
members' mean probability of the target and the share of prompts where it exceeds 0.5; beside them the same
for the target's own word through the slot (the steering direction known to exist).

    python benchmarks/token_starts.py --target star --starts 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from sage_lightning.searches import UniversalTokenSearch

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "universal_token.yaml"
MODEL_KEYS = ("diffusion", "num_steps", "guidance_scale", "scheduler", "step_units", "box", "loss")


def probe(config: dict, target: str, init: str, seed: int, word: str | None = None) -> tuple[float, float, float]:
    """(mean target probability, share of prompts above 0.5, token norm) at one starting point."""
    from sage_lightning.datamodules import PromptSetDataModule

    model = {k: v for k, v in config["model"]["init_args"].items() if k in MODEL_KEYS}
    data = PromptSetDataModule(**config["data"]["init_args"])
    search = UniversalTokenSearch(target=target, init=init, init_word=word, init_seed=seed, **model)
    search.prepare(data.targets, data.held_out)
    search.init_parameters()
    probs = []
    with torch.no_grad():
        for start in range(0, len(search.targets), 12):
            batch = search.targets[start:start + 12]
            out = search.surrogate(search.render(batch, True), search.target_index.expand(len(batch)), towards=True)
            probs.append(out.probs.mean(0))
    p = torch.cat(probs)
    return float(p.mean()), float((p > 0.5).float().mean()), float(search.token.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="star")
    parser.add_argument("--starts", type=int, default=8, help="starting points per rule (seeds 0..K-1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--config", default=str(CONFIG))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = yaml.safe_load(Path(args.config).read_text())
    rows = [("target word", *probe(config, args.target, "word", 0, args.target))]
    for init in ("random_row", "mean_noise"):
        runs = [probe(config, args.target, init, seed) for seed in range(args.starts)]
        best = max(runs)
        rows.append((f"{init}: best of {args.starts}", *best))
        rows.append((f"{init}: median of {args.starts}", sorted(r[0] for r in runs)[len(runs) // 2], float("nan"),
                     sorted(r[2] for r in runs)[len(runs) // 2]))
    print(f"\ntarget {args.target}; training prompts of {args.config}; no optimisation\n")
    print("| start | members' mean p(target) | prompts with p > 0.5 | token norm |\n|---|---|---|---|")
    for name, p, share, norm in rows:
        print(f"| {name} | {p:.4f} | {'-' if share != share else f'{share:.0%}'} | {norm:.3f} |")


if __name__ == "__main__":
    main()
