"""`graft demo`: the whole workflow on a real bundled sample, offline."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    out: Path = typer.Option(Path("graft-demo"), "--out", "-o", help="Folder for the demo's data and run: a new or empty folder, or a demo to --overwrite."),
    per_class: int = typer.Option(30, help="Images per class to train on (a fifth is held out for validation)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier demo in --out (files graft did not write are never touched)."),
) -> None:
    """Build a small real few-shot task, then train, evaluate and predict on it (no download)."""
    from graft.demo import run_demo  # torch loads only when a command runs: `graft --help` stays instant

    run_demo(out, per_class=per_class, overwrite=overwrite)
