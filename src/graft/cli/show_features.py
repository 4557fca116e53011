"""`graft show-features BUNDLE IMAGE --out maps.png`: what each stage sees in one image."""

from __future__ import annotations

from pathlib import Path

import typer


def show_features(
    bundle: Path = typer.Argument(..., help="A bundle folder (or the run folder that holds one)."),
    image: Path = typer.Argument(..., help="The image file to look at."),
    out: Path = typer.Option(..., "--out", "-o", help="The PNG file to write."),
    stages: str = typer.Option("all", help="Stages by index or name, comma-separated (0,3,-1 or blocks.2); 'all' for every stage."),
    channels: int = typer.Option(6, help="How many channels per stage (the most active on this image)."),
) -> None:
    """Draw the activations of a few channels at each chosen stage of the bundle's backbone."""
    from graft.shipping.bundle import load_bundle  # torch loads only when a command runs: `graft --help` stays instant
    from graft.report.activations import write_feature_maps  # torch loads only when a command runs: `graft --help` stays instant

    written = write_feature_maps(load_bundle(bundle), image, out, stages=stages, channels=channels)
    typer.echo(f"feature maps written to {written}")
