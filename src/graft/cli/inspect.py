"""`graft inspect NAME`: a backbone's stages, and what a strategy would train."""

from __future__ import annotations

from typing import Optional

import typer

from graft.choices import DEFAULT_BACKBONE
from graft.cli import options
from graft.console import Reporter, make_console, show_audit


@options.config_options(
    "weights", "head", "lr", "train_stages", "lr_decay", "thaw_every", "train_bn", "lora_rank", "bn_stats", "pooling",
    first=("strategy",),
)
def inspect(
    name: str = typer.Argument(DEFAULT_BACKBONE, help="A timm model name (bundled offline: efficientnet_lite0/1/2)."),
    strategy: Optional[str] = typer.Option(None, help="Also show what this strategy trains, stage by stage."),
    pretrained: bool = typer.Option(True, "--pretrained/--architecture-only", help="Load pretrained weights, or only build the architecture."),
    num_classes: int = typer.Option(2, help="Number of classes for the strategy audit."),
    **settings: object,
) -> None:
    """Show a backbone's stages (name, parameters, output channels and stride) and preprocessing."""
    from rich.table import Table

    from graft.api import inspect as inspect_backbone  # torch loads only when a command runs: `graft --help` stays instant

    weights = settings.pop("weights")
    found = inspect_backbone(name, pretrained=pretrained, weights=str(weights) if weights else None, strategy=strategy,
                             num_classes=num_classes, **settings)
    console = make_console()
    console.print(f"{found.architecture}: {found.total_params:,} parameters, {found.num_features} features; weights: {found.weights_source}")
    p = found.preprocessing
    console.print(f"preprocessing: {p['input_size'][1]}x{p['input_size'][2]} px, {p['interpolation']}, mean {p['mean']}, std {p['std']}, crop {p['crop_pct']}")
    table = Table("#", "stage", "params", "channels", "stride", title="stages, input to head", title_justify="left")
    for stage in found.stages:
        table.add_row(str(stage.index), stage.name, f"{stage.num_params:,}", str(stage.out_channels or "-"), str(stage.reduction or "-"))
    console.print(table)
    if found.audit is not None:

        show_audit(Reporter(console=console), f"strategy {strategy}: what trains", found.audit)
