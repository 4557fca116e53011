"""`graft inspect NAME`: a backbone's stages, and what a strategy would train."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from graft.choices import DEFAULT_BACKBONE
from graft.cli import options
from graft.console import Reporter, make_console, show_audit


def inspect(
    name: str = typer.Argument(DEFAULT_BACKBONE, help="A timm model name (bundled offline: efficientnet_lite0/1/2)."),
    strategy: Optional[str] = typer.Option(None, help="Also show what this strategy trains, stage by stage."),
    weights: Optional[Path] = options.config_option("weights"),
    pretrained: bool = typer.Option(True, "--pretrained/--architecture-only", help="Load pretrained weights, or only build the architecture."),
    head: str = options.config_option("head"),
    num_classes: int = typer.Option(2, help="Number of classes for the strategy audit."),
    lr: Optional[float] = options.config_option("lr"),
    train_stages: Optional[int] = options.config_option("train_stages"),
    lr_decay: float = options.config_option("lr_decay"),
    thaw_every: int = options.config_option("thaw_every"),
    train_bn: bool = options.config_option("train_bn", "--train-bn"),
    lora_rank: int = options.config_option("lora_rank"),
    bn_stats: str = options.config_option("bn_stats"),
    pooling: Optional[str] = options.config_option("pooling"),
) -> None:
    """Show a backbone's stages (name, parameters, output channels and stride) and preprocessing."""
    from rich.table import Table

    from graft.api import inspect as inspect_backbone  # torch loads only when a command runs: `graft --help` stays instant

    found = inspect_backbone(name, pretrained=pretrained, weights=str(weights) if weights else None,
                             strategy=strategy, num_classes=num_classes, head=head, lr=lr,
                             train_stages=train_stages, lr_decay=lr_decay, thaw_every=thaw_every, train_bn=train_bn,
                             lora_rank=lora_rank, bn_stats=bn_stats, pooling=pooling)
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
