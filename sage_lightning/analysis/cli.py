"""``sage analyze RUN_DIR --what prompt-independence,failure-kind,region,failure-types [options]``.

Every analysis is a plain batched loop over the run's failures, reproducible from ``--seed`` and bounded by the
flags (``--max-latents``, ``--samples-per-radius``, ``--prior-draws``, ...). User mistakes end with one line
``sage: error: ...`` and exit status 2 (``sage_lightning/cli.py`` prints them).
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from sage_lightning.errors import SageError, closest_names

ANALYSES = ("prompt-independence", "failure-kind", "region", "failure-types")
TOKEN_SEARCHES = ("UniversalTokenSearch", "RandomTokenSearch")


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes are SageErrors (one line), not usage dumps."""

    def error(self, message: str):  # noqa: D102
        raise SageError(f"{message} (sage analyze --help lists the options)")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sage analyze", description="The SAGE paper's analyses of a run folder.")
    p.add_argument("run_dir", help="a run folder written by `sage fit` (its --trainer.default_root_dir)")
    p.add_argument("--what", default=",".join(ANALYSES), help=f"comma-separated, from: {', '.join(ANALYSES)}")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw of the analyses")
    p.add_argument("--max-latents", type=int, default=None, help="analyse at most this many failures (by target id)")
    p.add_argument("--batch-size", type=int, default=8, help="images per generation call")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--threshold", type=float, default=0.8, help="prompt-independence: share of prompts that fail")
    p.add_argument("--radii", default=None, help="region: radii as fractions of sqrt(d), e.g. 0.02,0.04,0.08")
    p.add_argument("--samples-per-radius", type=int, default=16, help="region: points per sphere")
    p.add_argument("--off-shell", action="store_true",
                   help="region: sample the whole sphere around z (default: only on the Gaussian shell |z'| = |z|)")
    p.add_argument("--prior-draws", type=int, default=32, help="region: fresh N(0, I) latents per class (0: none)")
    p.add_argument("--confidence", type=float, default=0.5, help="failure-kind proxy: members' mean probability")
    p.add_argument("--max-k", type=int, default=8, help="failure-types: largest k tried for the CLIP clusters")
    p.add_argument("--clip", default=None, help="failure-types: CLIP for image features (hub id or folder)")
    p.add_argument("--local-files-only", action="store_true", help="never download (hub ids must be cached)")
    return p


def _check(args: argparse.Namespace) -> list[str]:
    chosen = [w.strip() for w in args.what.split(",") if w.strip()]
    for name in chosen:
        if name not in ANALYSES:
            near = closest_names(name, ANALYSES, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise SageError(f"--what {name!r} is not an analysis: {hint}choose from {', '.join(ANALYSES)}")
    if not chosen:
        raise SageError(f"--what names no analysis: choose from {', '.join(ANALYSES)}")
    for flag, value, least in (("--max-latents", args.max_latents, 1), ("--batch-size", args.batch_size, 1),
                               ("--samples-per-radius", args.samples_per_radius, 1),
                               ("--prior-draws", args.prior_draws, 0), ("--max-k", args.max_k, 2)):
        if value is not None and value < least:
            raise SageError(f"{flag} {value} must be at least {least}")
    if not 0 < args.threshold <= 1:
        raise SageError(f"--threshold {args.threshold} must be a share in (0, 1]")
    if not 0 < args.confidence <= 1:
        raise SageError(f"--confidence {args.confidence} must be a probability in (0, 1]")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", args.device):
        raise SageError(f"--device {args.device!r} is not a device: use auto, cpu, cuda or cuda:N")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SageError(f"--device {args.device}: no CUDA device here; use --device cpu")
    return list(dict.fromkeys(chosen))


def _radii(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise SageError(f"--radii {text!r} must be comma-separated numbers, e.g. 0.02,0.04,0.08") from err
    if not values or min(values) <= 0:
        raise SageError(f"--radii {text!r} must be positive fractions of sqrt(d), e.g. 0.02,0.04,0.08")
    return values


def run_analyses(args: argparse.Namespace) -> dict[str, dict]:
    """Run the chosen analyses on ``args.run_dir``; returns each one's summary."""
    from sage_lightning.analysis import failure_kind, failure_types, prompt_independence, region
    from sage_lightning.analysis.common import AnalysisRun

    chosen = _check(args)
    radii = _radii(args.radii)
    run = AnalysisRun(args.run_dir, device=args.device, batch_size=args.batch_size)
    if run.search_name in TOKEN_SEARCHES:
        raise SageError(
            f"{args.run_dir!r} is a {run.search_name} run: the analyses study the failures of latent and prompt "
            "searches; a token run's figures are in its summary.json"
        )
    if not run.records:
        raise SageError(f"{args.run_dir!r} holds no results.jsonl lines yet: nothing to analyse")
    summaries = {}
    for name in chosen:
        if name == "prompt-independence":
            summaries[name] = prompt_independence.analyze(run, args.max_latents, args.threshold)
        elif name == "failure-kind":
            summaries[name] = failure_kind.analyze(run, args.max_latents, args.confidence)
        elif name == "region":
            kwargs = {} if radii is None else {"rhos": radii}
            summaries[name] = region.analyze(run, args.max_latents, samples=args.samples_per_radius,
                                             prior_draws=args.prior_draws, seed=args.seed, shell=not args.off_shell,
                                             **kwargs)
        else:
            summaries[name] = failure_types.analyze(run, args.max_latents, args.max_k, args.clip, args.seed,
                                                    args.local_files_only)
    return summaries


def main(argv: list[str]) -> None:
    """``sage analyze ...`` (``argv`` without the word ``analyze``); raises SageError on a user mistake."""
    args = parser().parse_args(argv)
    summaries = run_analyses(args)
    for name, summary in summaries.items():
        brief = {k: v for k, v in summary.items() if not k.startswith(("pooled_", "prompts_with_"))}
        print(f"{name}: {json.dumps(brief)}", file=sys.stdout)
    print(f"Written: {args.run_dir}/analysis/")


def command(argv: list[str]) -> None:
    """``sage analyze``'s entry from ``sage_lightning.cli.main``: a user mistake is one ``sage: error:`` line and
    exit status 2, without a traceback."""
    from sage_lightning.errors import shorten

    try:
        main(argv)
    except SageError as err:
        print(f"sage: error: {shorten(' '.join(str(err).split()))}", file=sys.stderr)
        sys.exit(2)
