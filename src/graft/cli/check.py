"""`graft check DATA`: likely wrong labels, duplicates and train/validation leaks, odd classes and images."""

from __future__ import annotations

from pathlib import Path
import typer

from graft.cli import options
from graft.console import Reporter

SHOWN = 20  # findings printed; data_check.csv has them all


@options.config_options("backbone", "weights", "seed", "val_fraction", "device", "cache_dir", first=("out",))
def check(
    data: Path = typer.Argument(..., help=options.config_help("data")),
    out: Path = typer.Option(Path("runs/check"), "--out", "-o", help="Folder for data_check.csv and data_check.json: a new or empty folder, or an earlier check's with --overwrite."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the earlier graft check in --out: its files are removed first (files graft did not write are never touched; a run is never replaced)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the summary line."),
    **settings: object,
) -> None:
    """Check a labelled folder before training: likely wrong labels (cleanlab on out-of-fold
    probabilities of the frozen backbone's features), exact and near duplicates, duplicates across
    train and validation, small or imbalanced classes, tiny and grayscale images. Writes
    data_check.csv (path, issue, score, suggested_label, detail) to --out; never changes a file in DATA.
    The split is graft train's for the same --seed and --val-fraction."""
    from graft.api import check as check_data  # torch loads only when a command runs: `graft --help` stays instant

    result = check_data(data, out, overwrite=overwrite, verbose=not quiet, **settings)
    reporter = Reporter()
    if not quiet and result.findings:
        reporter.table(
            f"first {min(SHOWN, len(result.findings))} of {len(result.findings)} findings",
            ["path", "issue", "score", "suggested label", "detail"],
            [(f.path, f.issue, f"{f.score:.3f}", f.suggested_label, f.detail) for f in result.findings[:SHOWN]],
        )
    typer.echo(result.summary())
    typer.echo(f"written: {out / 'data_check.csv'}")
