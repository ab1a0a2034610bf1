"""Number formatting and markdown tables for reports.

from lmtrain.tables import fmt, markdown_table
print(markdown_table(["name", "ms"], [["forward", fmt(1.25, 2)]]))
"""

from __future__ import annotations


def fmt(value, digits: int = 1, missing: str = "-") -> str:
    if value is None:
        return missing
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
