"""What graft tells the user while it works: messages, tables and progress bars (rich).

Messages go to stderr so that `graft predict --format json` keeps stdout clean. A `Reporter`
with `verbose=False` says nothing (the Python API's default in tests and notebooks is verbose).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class Reporter:
    def __init__(self, verbose: bool = True, console: Console | None = None) -> None:
        self.verbose = verbose
        self.console = console or Console(stderr=True, highlight=False)

    def say(self, message: str) -> None:
        if self.verbose:
            self.console.print(message)

    def warn(self, message: str) -> None:
        if self.verbose:
            self.console.print(f"[yellow]warning:[/yellow] {message}")

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        if not self.verbose:
            return
        table = Table(title=title, title_justify="left")
        for column in columns:
            table.add_column(column, justify="right" if column not in ("stage", "class", "name") else "left")
        for row in rows:
            table.add_row(*[str(cell) for cell in row])
        self.console.print(table)

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Callable[..., None]]:
        """A progress bar; yields `advance(n=1, status=None)`."""
        if not self.verbose:
            yield lambda n=1, status=None: None
            return
        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        ]
        with Progress(*columns, console=self.console, transient=False) as bar:
            task = bar.add_task(description, total=total, status="")

            def advance(n: int = 1, status: str | None = None) -> None:
                if status is not None:
                    bar.update(task, advance=n, status=status)
                else:
                    bar.update(task, advance=n)

            yield advance


QUIET = Reporter(verbose=False)
