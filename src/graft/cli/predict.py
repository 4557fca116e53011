"""`graft predict BUNDLE PATH...`: top-k labels per image, as a table, CSV or JSON lines."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import List

import typer

FORMATS = ("table", "csv", "json")


def predict(
    bundle: Path = typer.Argument(..., help="A bundle folder (or the run folder that holds one)."),
    paths: List[Path] = typer.Argument(..., help="Image files and folders (searched recursively)."),
    top_k: int = typer.Option(3, "--top-k", "-k", help="How many labels to give per image."),
    output_format: str = typer.Option("table", "--format", "-f", help="table, csv, or json (one object per line)."),
    batch_size: int = typer.Option(32, help="Images per forward pass."),
) -> None:
    """Predict the labels of images with a trained bundle."""
    from graft.api import predict as predict_images
    from graft.bundle import load_bundle
    from graft.errors import ConfigError, ImageError

    if output_format not in FORMATS:
        raise ConfigError(f"--format: {output_format!r} is not one of {', '.join(FORMATS)}")
    if top_k < 1:
        raise ConfigError(f"--top-k: expected 1 or more, got {top_k}")
    model = load_bundle(bundle)
    failures: list[ImageError] = []

    def on_error(error: ImageError) -> None:
        failures.append(error)
        print(f"graft: skipped {error.path}: {error.reason}", file=sys.stderr)
        if output_format == "json":
            print(json.dumps({"path": error.path, "error": error.reason}), flush=True)

    stream = model.iter_predict(_expand(paths), top_k=top_k, batch_size=batch_size, on_error=on_error)
    if output_format == "json":
        for prediction in stream:
            print(json.dumps(prediction.to_dict()), flush=True)
    elif output_format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(["path", "label", "score", "top_k"])
        for prediction in stream:
            writer.writerow([prediction.path, prediction.label, f"{prediction.score:.6f}",
                             ";".join(f"{label}:{score:.4f}" for label, score in prediction.top_k)])
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table("path", "label", "score", f"top {top_k}")
        for prediction in stream:
            table.add_row(prediction.path, prediction.label, f"{prediction.score:.3f}",
                          ", ".join(f"{label} {score:.2f}" for label, score in prediction.top_k))
        Console(highlight=False).print(table)
    if failures:
        raise typer.Exit(1)


def _expand(paths: List[Path]):
    from graft.api import expand_image_paths

    return expand_image_paths(paths)
