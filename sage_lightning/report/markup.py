"""Small HTML builders shared by the report's sections: escaped text, numbers, tables, definition lists."""

from __future__ import annotations

import html
import math

TABLE_CAP = 200  # rows shown of a very long table


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: object) -> str:
    """A value as the page shows it: floats to 3 significant digits, None as a dash, dicts as key: value."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return str(value)  # seeds and ids: no thousands separators
    if isinstance(value, dict):
        return ", ".join(f"{k}: {fmt(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(fmt(v) for v in value)
    return str(value)


def cell(value: object) -> str:
    """A table cell: raw HTML when given as ``Raw``, else the escaped formatted value."""
    return value.html if isinstance(value, Raw) else esc(fmt(value))


class Raw:
    """HTML already built (not escaped again)."""

    def __init__(self, markup: str) -> None:
        self.html = markup


def table(rows: list[dict], cls: str = "", row_cls: str = "", cap: int = TABLE_CAP) -> str:
    """A table of flat dicts (columns: every key, in first-seen order); rows past ``cap`` are left out, with a note."""
    if not rows:
        return "<p class='empty'>No rows.</p>"
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join(
        f"<tr class='{row_cls}'>" + "".join(f"<td>{cell(row.get(c))}</td>" for c in columns) + "</tr>"
        for row in rows[:cap]
    )
    note = (f"<p class='note'>First {cap} of {len(rows)} rows shown; the full data is in the run folder.</p>"
            if len(rows) > cap else "")
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"


def definitions(items: list[tuple[str, object]]) -> str:
    """A definition list of ``(label, value)``."""
    return "<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{cell(v)}</dd>" for k, v in items) + "</dl>"


def image(src: str, alt: str, cls: str = "") -> str:
    return f"<img src='{esc(src)}' alt='{esc(alt)}' class='{cls}'>"
