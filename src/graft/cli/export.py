"""`graft export BUNDLE --onnx`: an ONNX model, checked against PyTorch on real images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from graft.errors import ConfigError


def export(
    bundle: Path = typer.Argument(..., help="A bundle folder (or the run folder that holds one)."),
    onnx: bool = typer.Option(False, "--onnx", help="Export to ONNX (the one format for now)."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset version."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write (default: model.onnx beside the bundle folder)."),
    check_images: Optional[List[Path]] = typer.Option(
        None, "--check-images", help="Images or folders to check ONNX against PyTorch on (default: scikit-image's photos)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Export a bundle to ONNX, checked with onnxruntime against PyTorch."""

    if not onnx:
        raise ConfigError("graft export: choose a format; --onnx is the one supported (graft export BUNDLE --onnx)")
    from graft.api import expand_image_paths  # torch loads only when a command runs: `graft --help` stays instant
    from graft.shipping.export import export_onnx  # torch loads only when a command runs: `graft --help` stays instant

    images = list(expand_image_paths(check_images)) if check_images else None
    result = export_onnx(bundle, out=out, opset=opset, check_images=images)
    summary = {
        "path": str(result.path),
        "opset": result.opset,
        "max_abs_diff": result.max_abs_diff,
        "tolerance": result.tolerance,
        "check_images": result.num_check_images,
        "check_source": result.check_source,
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(
        f"wrote {result.path} (opset {result.opset}, dynamic batch)\n"
        f"checked with onnxruntime on {result.num_check_images} images ({result.check_source}): "
        f"max |{result.compared[:-1]} difference| {result.max_abs_diff:.2e} < {result.tolerance:g}"
    )
