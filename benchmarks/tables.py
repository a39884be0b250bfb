"""The pieces every generated table is made of: numbers as the tables print them, the table itself,
and the line naming the command and machine a result came from."""

from __future__ import annotations

import math
from typing import Any


def number(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def machine(result: dict[str, Any]) -> str:
    """The machine a result was measured on, and the commit where the result file records one."""
    m = result["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cores']} cores"
    commit = result.get("commit") or m.get("commit")
    return f"{where}, torch {m['torch']}, {m['threads']} CPU thread(s)" + (f", commit {commit}" if commit else "")


def source(result: dict[str, Any], what: str = "medians, see the benchmark's docstring") -> str:
    return f"\n`{result['command'].strip()}` — {machine(result)}; {what}.\n"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def group_rows(result, group):
    return [row for row in result["rows"] if row.get("group") == group]


def finite(value: Any) -> float:
    """A number of a strict-JSON result (where a value that is not finite was written as null)."""
    return math.nan if value is None else float(value)
