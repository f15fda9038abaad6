"""Markdown tables for the benchmark reports (bench/report.py, bench/report_model.py)."""
from __future__ import annotations


def markdown_table(headers, rows, numeric_from: int) -> list[str]:
    """Lines of a markdown table: the header row, the separator row and one line per row.

    Columns from index ``numeric_from`` on are right-aligned (the numbers), those before it
    left-aligned. Cells are rendered with ``str``; format numbers before passing them.
    """
    def line(cells):
        return "| " + " | ".join(str(c) for c in cells) + " |"

    align = ["---" if k < numeric_from else "---:" for k in range(len(headers))]
    return [line(headers), "|" + "|".join(align) + "|"] + [line(r) for r in rows]
