"""What graft tells the user while it works: messages, tables and progress bars (rich).

Messages go to stderr so that `graft predict --format json` keeps stdout clean. A `Reporter`
with `verbose=False` says nothing (the Python API's default in tests and notebooks is verbose).

Every string is printed as given: file names, class names and paths come from the user, and a
name such as `photo[edited].png` or `:smile:.jpg` must not be read as rich markup or an emoji
code. So graft's consoles (`make_console`) have markup, emoji codes and highlighting off, and a
`Reporter` turns every string into a `rich.text.Text` (never parsed) even on a console it is
given. graft's own styling is written as `Text` with a style (`Text.assemble(("done", "bold"))`).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from graft.strategies.base import AuditRow


def make_console(*, stderr: bool = False) -> Console:
    """A rich console that prints strings literally: no markup, no emoji codes, no highlighting."""
    return Console(stderr=stderr, markup=False, emoji=False, highlight=False)


def literal(value: object) -> Text:
    """`value` as rich text that is shown exactly as written (a `Text` is kept as it is)."""
    return value if isinstance(value, Text) else Text(str(value))


class Reporter:
    def __init__(self, verbose: bool = True, console: Console | None = None) -> None:
        self.verbose = verbose
        self.console = console or make_console(stderr=True)

    def say(self, message: str | Text) -> None:
        """Print `message` as written (a `Text` carries its own styles)."""
        if self.verbose:
            self.console.print(literal(message))

    def warn(self, message: str | Text) -> None:
        if self.verbose:
            self.console.print(Text.assemble(("warning:", "yellow"), " ", literal(message)))

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        if not self.verbose:
            return
        table = Table(title=literal(title), title_justify="left")
        for column in columns:
            table.add_column(literal(column), justify="right" if column not in ("stage", "class", "name") else "left")
        for row in rows:
            table.add_row(*[literal(cell) for cell in row])
        self.console.print(table)

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Callable[..., None]]:
        """A progress bar; yields `advance(n=1, status=None)`."""
        if not self.verbose:
            yield lambda n=1, status=None: None
            return
        columns = [
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}", markup=False),
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


def show_audit(reporter: Reporter, title: str, rows: Sequence[AuditRow]) -> None:
    """A strategy's audit as a table: per stage, what trains, at which learning rate, BatchNorm's mode."""
    reporter.table(
        title,
        ["stage", "trainable", "total", "lr", "BatchNorm"],
        [
            (r.stage, f"{r.trainable_params:,}", f"{r.total_params:,}", f"{r.lr:.2g}" if r.lr else "-", r.bn_mode)
            for r in rows
        ],
    )
