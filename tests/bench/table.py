"""A bench stage run alone prints its report rows as a table."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_rows(title: str, rows: list[tuple[str, str, str]]) -> None:
    table = Table(title=title)
    for col in ("measure", "value", "goal"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
