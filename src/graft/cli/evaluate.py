"""`graft evaluate BUNDLE DIR`: the bundle's metrics on another labelled folder."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from graft.cli import options
from graft.console import Reporter, make_console


def evaluate(
    bundle: Path = typer.Argument(..., help="A bundle folder (or the run folder that holds one)."),
    data: Path = typer.Argument(..., help="Labelled folder (one sub-folder per class), CSV of path,label, or multi-label CSV of path,labels."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON (the keys of metrics.json)."),
    on_bad_image: str = typer.Option("error", help="error: stop and list unreadable images; skip: evaluate without them (each is named)."),
    unknown: str = typer.Option("auto", "--unknown", help=options.UNKNOWN_HELP + " auto reports the share answered 'unknown'."),
) -> None:
    """Evaluate a trained bundle on a labelled folder."""
    from graft.api import evaluate as evaluate_bundle  # torch loads only when a command runs: `graft --help` stays instant

    metrics = evaluate_bundle(bundle, data, on_bad_image=on_bad_image, unknown=unknown)
    reporter = Reporter()  # on stderr, so --json keeps stdout clean
    for bad in metrics["bad_images"]:
        reporter.warn(f"skipped {bad['path']}: {bad['reason']}")
    if as_json:
        typer.echo(json.dumps(metrics, indent=2))
        return
    from rich.table import Table


    console = make_console()
    if metrics.get("task") == "multilabel":
        _print_label_set_metrics(console, metrics)
        return
    averaged = metrics["macro_f1_classes"]
    over = "" if len(averaged) == len(metrics["class_names"]) else (
        f" (over the {len(averaged)} of {len(metrics['class_names'])} classes that are in the folder or predicted: "
        f"{', '.join(averaged)})"
    )
    console.print(f"{metrics['num_images']} images: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}{over}")
    console.print(f"calibrated scores (temperature {metrics['temperature']:.3g}): ECE {metrics['ece']:.4f} (15 bins), "
                  f"NLL {metrics['nll']:.4f}, Brier {metrics['brier']:.4f}")
    if "unknown_rate" in metrics:
        console.print(f"unknown: {metrics['num_unknown']} images ({metrics['unknown_rate']:.1%}) are unlike the training images "
                      "(accuracy counts the best class of every image)")
    table = Table("class", "precision", "recall", "f1", "support")
    for name, row in metrics["per_class"].items():
        table.add_row(name, f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}", str(row["support"]))
    console.print(table)


def _print_label_set_metrics(console, metrics: dict) -> None:
    """A multi-label bundle's scores: mAP and F1 at its thresholds, then one row per label."""
    from rich.table import Table


    console.print(f"{metrics['num_images']} images: mAP {metrics['map']:.4f}, micro-F1 {metrics['micro_f1']:.4f}, "
                  f"macro-F1 {metrics['macro_f1']:.4f}, whole label set right {metrics['accuracy']:.4f}")
    table = Table("label", "precision", "recall", "f1", "AP", "support", "threshold")
    for name, row in metrics["per_class"].items():
        table.add_row(name, f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}",
                      "-" if row["ap"] is None else f"{row['ap']:.3f}", str(row["support"]), f"{row['threshold']:.3f}")
    console.print(table)
