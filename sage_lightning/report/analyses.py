"""The generic section of one analysis (``RUN_DIR/analysis/<name>.json``, written by sage_lightning.analysis).

An analysis file holds ``title`` (str), ``summary`` (flat dict), ``rows`` (list of flat dicts: one table),
``images`` (paths relative to the run folder) and ``notes`` (how to read it). The report renders each as a
section, in name order, without knowing what it measures; a file it cannot read is named, not fatal.
"""

from __future__ import annotations

from collections.abc import Callable

from sage_lightning.report.markup import definitions, esc, image, table


def analysis_section(name: str, content: dict | None, src: Callable[[str], str | None]) -> str:
    """The HTML section of analysis ``name``; ``src`` maps a run-relative path to the page's image path (None:
    the file is missing, which the section says instead of showing a broken image)."""
    anchor = f"analysis-{esc(name)}"
    if not isinstance(content, dict):
        return (f"<section id='{anchor}' class='analysis'><h3>{esc(name)}</h3>"
                f"<p class='warn'>analysis/{esc(name)}.json is not readable JSON: rerun that analysis.</p></section>")
    parts = [f"<section id='{anchor}' class='analysis'><h3>{esc(content.get('title') or name)}</h3>"]
    if content.get("notes"):
        parts.append(f"<p class='notes'>{esc(content['notes'])}</p>")
    summary = content.get("summary")
    if isinstance(summary, dict) and summary:
        parts.append(definitions(list(summary.items())))
    rows = content.get("rows")
    if isinstance(rows, list) and rows:
        parts.append(table([r for r in rows if isinstance(r, dict)], cls="analysis-rows"))
    for path in content.get("images") or []:
        where = src(str(path))
        parts.append(f"<figure>{image(where, f'{name}: {path}', 'plot')}</figure>" if where else
                     f"<p class='warn'>image {esc(path)} is missing from the run folder.</p>")
    parts.append("</section>")
    return "".join(parts)
