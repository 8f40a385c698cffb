"""Terminal output: tables and progress, with rich when it is installed, plain lines otherwise."""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Sequence


def rich_available() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def format_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table, columns padded to their widest cell (numbers right-aligned)."""
    cells = [[str(c) for c in columns]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]

    def numeric(text: str) -> bool:
        return text[:1].isdigit() or text[:1] in "+-." and text[1:2].isdigit()

    def line(row):
        parts = [cell.rjust(w) if numeric(cell) else cell.ljust(w) for cell, w in zip(row, widths)]
        return "  ".join(parts).rstrip()

    out = [title] if title else []
    out += [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in cells[1:]]
    return "\n".join(out)


class Display:
    """Where the bench command writes: a rich console or plain ``print``."""

    def __init__(self, plain: bool | None = None, file=None):
        self.file = file
        self.plain = (not rich_available()) if plain is None else plain
        self._console = None
        if not self.plain:
            from rich.console import Console

            width = shutil.get_terminal_size((160, 24)).columns if sys.stdout.isatty() else 160
            self._console = Console(file=file, width=max(width, 100), highlight=False)

    def line(self, text: str = "", style: str | None = None) -> None:
        if self._console is not None:
            self._console.print(text, style=style, markup=False)
        else:
            print(text, file=self.file or sys.stdout, flush=True)

    def table(self, title: str | None, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        if self._console is None:
            self.line(format_table(title, columns, rows))
            return
        from rich.table import Table

        table = Table(title=title, title_justify="left", header_style="bold")
        for i, name in enumerate(columns):
            numeric = bool(rows) and all(str(r[i])[:1].isdigit() or str(r[i]) in ("-", "") for r in rows)
            table.add_column(name, justify="right" if numeric else "left", overflow="fold")
        for row in rows:
            table.add_row(*[str(c) for c in row])
        self._console.print(table)

    @contextlib.contextmanager
    def progress(self, total: int, description: str):
        """Yields a :class:`Progress`: ``start(label)`` before each of ``total`` steps, ``done(text)`` after."""
        if self._console is None or not self._console.is_terminal:
            yield Progress(self, total, None, None)
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with RichProgress(*columns, console=self._console, transient=True) as bar:
            yield Progress(self, total, bar, bar.add_task(description, total=total))


class Progress:
    def __init__(self, display: Display, total: int, bar, task):
        self.display, self.total, self.bar, self.task = display, total, bar, task
        self.count = 0

    def start(self, label: str) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.update(self.task, description=f"{label}")
        else:
            self.display.line(f"[{self.count}/{self.total}] {label} ...")

    def done(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(f"[{self.count}/{self.total}] {text}", markup=False, highlight=False)
            self.bar.update(self.task, advance=1)
        else:
            self.display.line(f"      {text}")
