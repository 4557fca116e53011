"""`graft predict BUNDLE PATH...`: top-k labels per image (a multi-label bundle: the label set
with scores), as a table, CSV or JSON lines."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import List

import typer

from graft.choices import UNKNOWN_MODES
from graft.cli import options
from graft.console import Reporter, make_console
from graft.errors import ConfigError, ImageError
from graft.ranges import BATCH_SIZE, TOP_K, check_number

FORMATS = ("table", "csv", "json")


def predict(
    bundle: Path = typer.Argument(..., help="A bundle folder (or the run folder that holds one)."),
    paths: List[Path] = typer.Argument(..., help="Image files and folders (searched recursively)."),
    top_k: int = typer.Option(3, "--top-k", "-k", help="How many labels to give per image."),
    output_format: str = typer.Option("table", "--format", "-f", help="table, csv, or json (one object per line)."),
    batch_size: int = typer.Option(32, help="Images per forward pass."),
    explain: Path | None = typer.Option(
        None, "--explain", help="Also write a class activation map (Grad-CAM overlay) per image into this folder."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Write CSV here, with a progress bar; resumes: appends, skips images already in it."
    ),
    threshold: float | None = typer.Option(None, "--threshold", help=options.THRESHOLD_HELP),
    unknown: str = typer.Option("auto", "--unknown", help=options.UNKNOWN_HELP),
) -> None:
    """Predict the labels of images with a trained bundle."""
    from graft.shipping.bundle import load_bundle  # torch loads only when a command runs: `graft --help` stays instant

    if output_format not in FORMATS:
        raise ConfigError(f"--format: {output_format!r} is not one of {', '.join(FORMATS)}")
    check_number("top_k", top_k, TOP_K)
    check_number("batch_size", batch_size, BATCH_SIZE)
    if unknown not in UNKNOWN_MODES:
        raise ConfigError(f"--unknown: {unknown!r} is not one of {', '.join(UNKNOWN_MODES)}")
    if out is not None and explain is not None:
        raise ConfigError("--explain and --out cannot be combined: write the CSV first, then explain the images you want to see")
    model = load_bundle(bundle)
    if threshold is not None and model.task != "multilabel":
        raise ConfigError(f"--threshold: {bundle} is a single-label bundle (it predicts the best label); --threshold is for multi-label bundles")
    if out is not None:
        _predict_to_file(model, paths, out, top_k, batch_size, threshold, unknown)
        return
    failures: list[ImageError] = []

    def on_error(error: ImageError) -> None:
        failures.append(error)
        print(f"graft: skipped {error.path}: {error.reason}", file=sys.stderr)
        if output_format == "json":
            print(json.dumps({"path": error.path, "error": error.reason}), flush=True)

    stream = model.iter_predict(_expand(paths), top_k=top_k, batch_size=batch_size, on_error=on_error, threshold=threshold, unknown=unknown)
    explained: list = []
    if explain is not None:
        stream = _remember(stream, explained)
    if model.task == "multilabel":
        _print_label_sets(stream, output_format, top_k)
    else:
        _print_predictions(stream, output_format, top_k)
    if explain is not None:
        _explain(model, explained, explain)
    if failures:
        raise typer.Exit(1)


def _print_predictions(stream, output_format: str, top_k: int) -> None:
    """Each prediction on stdout as it comes: a JSON object per line, CSV rows, or a table at the end."""
    if output_format == "json":
        for prediction in stream:
            print(json.dumps(prediction.to_dict()), flush=True)
    elif output_format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(["path", "label", "score", "top_k", "unknown_score"])
        for prediction in stream:
            writer.writerow([prediction.path, prediction.label, f"{prediction.score:.6f}",
                             ";".join(f"{label}:{score:.4f}" for label, score in prediction.top_k),
                             "" if prediction.unknown_score is None else f"{prediction.unknown_score:.6f}"])
    else:
        from rich.table import Table


        table = Table()
        table.add_column("path", overflow="fold")  # the whole name, wrapped, never cut to "…"
        for column in ("label", "score", f"top {top_k}", "unknown score"):
            table.add_column(column)
        for prediction in stream:
            table.add_row(prediction.path, prediction.label, f"{prediction.score:.3f}",
                          ", ".join(f"{label} {score:.2f}" for label, score in prediction.top_k),
                          "-" if prediction.unknown_score is None else f"{prediction.unknown_score:.3f}")
        make_console().print(table)


def _print_label_sets(stream, output_format: str, top_k: int) -> None:
    """Each image's label set with its scores: a JSON object per line, CSV rows, or a table at the end."""
    def joined(pairs, sep: str, digits: int) -> str:
        return sep.join(f"{label}:{score:.{digits}f}" for label, score in pairs)

    if output_format == "json":
        for prediction in stream:
            print(json.dumps(prediction.to_dict()), flush=True)
    elif output_format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(["path", "labels", "scores", "top_k"])
        for prediction in stream:
            writer.writerow([prediction.path, ";".join(label for label, _ in prediction.labels),
                             joined(prediction.labels, ";", 6), joined(prediction.top_k, ";", 4)])
    else:
        from rich.table import Table


        table = Table()
        table.add_column("path", overflow="fold")
        table.add_column("labels")
        table.add_column(f"top {top_k}")
        for prediction in stream:
            table.add_row(prediction.path, joined(prediction.labels, ", ", 2) or "(none)", joined(prediction.top_k, ", ", 2))
        make_console().print(table)


def _remember(stream, seen: list):
    # The maps are drawn after the listing so that predictions still stream out first.
    for prediction in stream:
        seen.append(prediction)
        yield prediction


def _explain(model, predictions: list, folder: Path) -> None:
    from graft.report.explain import explain_images  # torch loads only when a command runs: `graft --help` stays instant

    written = explain_images(model, [p.path for p in predictions], folder, labels=[p.top_k[0][0] for p in predictions])
    print(f"graft: {len(written)} class activation maps written to {folder}", file=sys.stderr)


def _predict_to_file(model, paths: List[Path], out: Path, top_k: int, batch_size: int, threshold: float | None, unknown: str) -> None:
    from graft.shipping.batch_predict import predict_to_csv  # torch loads only when a command runs: `graft --help` stays instant

    result = predict_to_csv(model, paths, out, top_k=top_k, batch_size=batch_size, reporter=Reporter(), threshold=threshold, unknown=unknown)
    print(f"graft: {result.written} predictions appended to {result.out} ({result.skipped} already there, "
          f"{len(result.failed)} unreadable)", file=sys.stderr)
    if result.failed:
        raise typer.Exit(1)


def _expand(paths: List[Path]):
    from graft.api import expand_image_paths  # torch loads only when a command runs: `graft --help` stays instant

    return expand_image_paths(paths)
