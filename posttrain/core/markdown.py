"""The one Markdown table writer: reports, the model card, the flow's artifact, compare and the benchmarks.

    markdown_table(["model", "score"], [["sft", 0.5]])   # '| model | score |\n|---|---|\n| sft | 0.500 |'

A cell is escaped so a table stays a table: `|` becomes `\\|`, a newline ` ⏎ `. Floats are written to three
decimals unless `cell` formats them otherwise; `padded` lines the columns up for reading in a terminal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


def escape(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ⏎ ")


def three_decimals(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown_table(header: list, rows: Iterable[list], cell: Callable[[object], str] = three_decimals,
                   padded: bool = False) -> str:
    """A Markdown table of `rows` under `header`, each value written by `cell` and escaped."""
    lines = [[escape(h) for h in header], *([escape(cell(v)) for v in row] for row in rows)]
    if not padded:
        body = ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join([body[0], "|---" * len(header) + "|", *body[1:]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    return "\n".join([body[0], "|" + "|".join("-" * (w + 2) for w in widths) + "|", *body[1:]])
