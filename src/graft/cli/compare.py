"""`graft compare DATA --strategies a,b,c --out DIR`: strategies side by side, one report."""

from __future__ import annotations

from pathlib import Path

import typer

from graft.cli import options
from graft.console import Reporter


@options.config_options(
    "backbone", "augment", "batch_size", "val_fraction", "on_bad_image", "device", "cache_dir", first=("strategies", "out"),
)
def compare(
    data: Path = typer.Argument(..., help=options.config_help("data")),
    strategies: str = typer.Option("feature-extract,partial", help="Comma-separated strategy names to run."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for compare.html, compare.json and one run folder per strategy: a new or empty folder, or a comparison to --overwrite."),
    epochs: int = typer.Option(10, help="The epoch budget, the same for every strategy."),
    seed: int = typer.Option(0, help="Seed of the split, augmentation and initialisation, the same for every strategy."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the comparison in --out: its files are removed first (files graft did not write are never touched)."),
    **settings: object,
) -> None:
    """Train several strategies on the same split, budget and seed; write one comparison report."""
    from graft.report.compare import compare as run_compare  # torch loads only when a command runs: `graft --help` stays instant

    result = run_compare(
        data, strategies, out, reporter=Reporter(verbose=not quiet), overwrite=overwrite, epochs=epochs, seed=seed,
        **{name: str(value) if isinstance(value, Path) else value for name, value in settings.items()},
    )
    for row in result.rows:
        status = f"accuracy {row.val_accuracy:.4f}" if row.error is None else f"FAILED ({row.error})"
        typer.echo(f"{row.strategy}: {status}")
    typer.echo(f"report {result.html_path}")
    if any(row.error for row in result.rows):
        raise typer.Exit(1)
