"""`graft evaluate BUNDLE DIR`: the bundle's metrics on another labelled folder."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from graft.shipping.unknown import UNKNOWN_HELP


def evaluate(
    bundle: Path = typer.Argument(..., help="A bundle folder (or the run folder that holds one)."),
    data: Path = typer.Argument(..., help="Labelled folder (one sub-folder per class) or CSV of path,label."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON (the keys of metrics.json)."),
    on_bad_image: str = typer.Option("error", help="error: stop and list unreadable images; skip: evaluate without them (each is named)."),
    unknown: str = typer.Option("auto", "--unknown", help=UNKNOWN_HELP + " auto reports the share answered 'unknown'."),
) -> None:
    """Evaluate a trained bundle on a labelled folder."""
    from graft.api import evaluate as evaluate_bundle
    from graft.console import Reporter

    metrics = evaluate_bundle(bundle, data, on_bad_image=on_bad_image, unknown=unknown)
    reporter = Reporter()  # on stderr, so --json keeps stdout clean
    for bad in metrics["bad_images"]:
        reporter.warn(f"skipped {bad['path']}: {bad['reason']}")
    if as_json:
        typer.echo(json.dumps(metrics, indent=2))
        return
    from rich.table import Table

    from graft.console import make_console

    console = make_console()
    averaged = metrics["macro_f1_classes"]
    over = "" if len(averaged) == len(metrics["class_names"]) else (
        f" (over the {len(averaged)} of {len(metrics['class_names'])} classes that are in the folder or predicted: "
        f"{', '.join(averaged)})"
    )
    console.print(f"{metrics['num_images']} images: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}{over}")
    if "unknown_rate" in metrics:
        console.print(f"unknown: {metrics['num_unknown']} images ({metrics['unknown_rate']:.1%}) are unlike the training images "
                      "(accuracy counts the best class of every image)")
    table = Table("class", "precision", "recall", "f1", "support")
    for name, row in metrics["per_class"].items():
        table.add_row(name, f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}", str(row["support"]))
    console.print(table)
