"""Notebook display: small HTML tables of labelled, value-free lines (and their plain text).

The objects that show themselves in a notebook (a query, its plan, a refresh report, a snapshot's
history) describe shapes: columns, operators, counts, estimates. Callers pass only such text; the
helpers escape it, so nothing they are given is read as markup.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence

_TABLE = (
    '<table class="healthimaging-df" style="border-collapse:collapse;text-align:left">'
    '<caption style="text-align:left;font-weight:bold">{title}</caption>{body}</table>'
)
_ROW = (
    '<tr><th style="text-align:left;vertical-align:top;padding-right:1em">{label}</th>'
    '<td style="text-align:left;white-space:pre-wrap">{value}</td></tr>'
)


def section(title: str, rows: Iterable[tuple[str, str]]) -> str:
    """An HTML table: a caption and one ``label | value`` row per item, every text escaped."""
    body = "".join(
        _ROW.format(label=html.escape(label), value=html.escape(value)) for label, value in rows
    )
    return _TABLE.format(title=html.escape(title), body=body)


def grid(title: str, header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """An HTML table with a header row and one row per item, every text escaped."""
    head = "".join(f'<th style="text-align:left">{html.escape(h)}</th>' for h in header)
    body = "".join(
        "<tr>"
        + "".join(f'<td style="text-align:left">{html.escape(c)}</td>' for c in row)
        + "</tr>"
        for row in rows
    )
    return _TABLE.format(title=html.escape(title), body=f"<tr>{head}</tr>{body}")


def plain(title: str, rows: Iterable[tuple[str, str]]) -> str:
    """The plain-text form of :func:`section`: the title, then ``label: value`` lines."""
    lines = [title]
    for label, value in rows:
        first, *rest = value.splitlines() or [""]
        lines.append(f"  {label}: {first}")
        lines += [f"    {line}" for line in rest]
    return "\n".join(lines)
