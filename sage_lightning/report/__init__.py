"""``sage report RUN_DIR``: one self-contained HTML page of what a SAGE run found (``RUN_DIR/report.html``).

Reads the run folder (:mod:`~sage_lightning.report.load`), draws the plots (:mod:`~sage_lightning.report.plots`),
compares against a baseline run when given (:mod:`~sage_lightning.report.baseline`) and writes the page
(:mod:`~sage_lightning.report.html`). Works on a run that was killed: it reports its finished targets.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sage_lightning.errors import SageError
from sage_lightning.report.load import LATENT, load_run

REPORT = "report.html"


def write_report(run_dir: str | Path, baseline: str | Path | None = None, out: str | Path | None = None) -> Path:
    """Write the report of ``run_dir`` (to ``out``, default ``run_dir/report.html``) and return its path."""
    from sage_lightning.report import plots
    from sage_lightning.report.baseline import compare
    from sage_lightning.report.html import render

    run = load_run(run_dir)
    comparison = compare(run, load_run(baseline)) if baseline is not None else None
    target = Path(out) if out is not None else run.root / REPORT
    if target.is_dir():
        raise SageError(f"--out {str(out)!r} is a folder: give a file name such as {str(target / REPORT)!r}")
    if not target.parent.is_dir():
        raise SageError(f"--out {str(out)!r}: folder {str(target.parent)!r} does not exist; create it or choose "
                        "another file")
    figures = [plots.plot_loss(run)]
    if run.kind == LATENT:
        figures += [plots.plot_norms(run), plots.plot_ks(run)]
    page = render(run, target, [f for f in figures if f], comparison)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, target)
    return target


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as sage does: one line, exit status 2."""

    def error(self, message: str) -> None:
        print(f"sage: error: {message} (sage report --help shows the usage)", file=sys.stderr)
        sys.exit(2)


def parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="sage report",
        description="Write RUN_DIR/report.html: the summary (SSR, NGR, cost per failure), per-class table, every "
                    "failure labelled, plots, and any analyses in RUN_DIR/analysis/.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a sage run folder (the one holding results.jsonl)")
    p.add_argument("--baseline", metavar="OTHER_RUN", help="a baseline run (e.g. random_latent) to compare "
                   "discovery rates with: SAGE ÷ baseline failures per 1,000 forward-equivalents")
    p.add_argument("--out", metavar="FILE", help="where to write the page (default RUN_DIR/report.html)")
    return p


def main(args: list[str]) -> None:
    """``sage report ...``: user mistakes end with one ``sage: error:`` line and exit status 2."""
    options = parser().parse_args(args)
    try:
        path = write_report(options.run_dir, options.baseline, options.out)
    except SageError as err:
        print(f"sage: error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
    print(f"sage report: {path.resolve()}")
