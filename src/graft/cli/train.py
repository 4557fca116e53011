"""`graft train DATA --out RUN`: adapt a backbone to a labelled folder and write the run."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from graft.cli import Interrupted, options

if TYPE_CHECKING:
    from graft.run_folder import OwnedFolder


def train(
    ctx: typer.Context,
    data: Path = typer.Argument(..., help=options.config_help("data")),
    out: Path = options.config_option("out", "--out", "-o", default=Path("runs/graft")),
    backbone: str = options.config_option("backbone"),
    weights: Optional[Path] = options.config_option("weights"),
    strategy: str = options.config_option("strategy"),
    head: str = options.config_option("head"),
    hidden: int = options.config_option("hidden"),
    dropout: float = options.config_option("dropout"),
    epochs: Optional[int] = options.config_option("epochs"),
    batch_size: int = options.config_option("batch_size"),
    lr: Optional[float] = options.config_option("lr"),
    weight_decay: float = options.config_option("weight_decay"),
    warmup_epochs: int = options.config_option("warmup_epochs"),
    label_smoothing: float = options.config_option("label_smoothing"),
    patience: Optional[int] = options.config_option("patience"),
    seed: int = options.config_option("seed"),
    val_fraction: float = options.config_option("val_fraction"),
    on_bad_image: str = options.config_option("on_bad_image"),
    augment: str = options.config_option("augment"),
    augment_views: Optional[int] = options.config_option("augment_views"),
    train_stages: Optional[int] = options.config_option("train_stages"),
    lr_decay: float = options.config_option("lr_decay"),
    thaw_every: int = options.config_option("thaw_every"),
    train_bn: bool = options.config_option("train_bn", "--train-bn"),
    lora_rank: int = options.config_option("lora_rank"),
    bn_stats: str = options.config_option("bn_stats"),
    crop_pct: Optional[float] = options.config_option("crop_pct"),
    pooling: Optional[str] = options.config_option("pooling"),
    head_solver: str = options.config_option("head_solver"),
    class_weighting: str = options.config_option("class_weighting"),
    precision: str = options.config_option("precision"),
    device: str = options.config_option("device"),
    compile: str = options.config_option("compile"),
    cache_dir: Optional[Path] = options.config_option("cache_dir"),
    check_data: bool = options.config_option("check_data", "--check-data/--no-check-data"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out from its last checkpointed epoch (same options)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the graft run in --out: its files are removed first (files graft did not write are never touched)."),
) -> None:
    """Train a classifier on DATA and write the run folder (with its bundle) to --out.

    Every option but --quiet, --resume and --overwrite is a setting of the run, saved in its config.json
    (graft.TrainConfig, whose fields give these options their names, defaults and help).
    """
    from graft.api import train_with_config
    from graft.console import Reporter
    from graft.errors import OutputError
    from graft.run_folder import read_manifest

    config = options.train_config(ctx.params)
    before = read_manifest(out)
    try:
        result = train_with_config(config, reporter=Reporter(verbose=not quiet), resume=resume, overwrite=overwrite)
    except KeyboardInterrupt:
        raise Interrupted(continue_hint(ctx, out, before, resume)) from None
    except OutputError as error:
        if error.__cause__ is None:
            raise  # a refusal before the run began: nothing to continue
        raise OutputError(f"{error}; then {continue_hint(ctx, out, before, resume)}") from error
    typer.echo(f"accuracy {result.metrics['accuracy']:.4f}  bundle {result.bundle_dir}")


def continue_hint(ctx: typer.Context, out: Path, before: "OwnedFolder | None", resume: bool) -> str:
    """How to go on after a stopped run: once this run wrote its config.json, the command with --resume."""
    from graft.run_folder import read_manifest

    now = read_manifest(out)
    started = now is not None and (resume or before is None or now.run_id != before.run_id)
    if not started or not (out / "config.json").is_file():
        return "the run had not started writing; run the same command again"
    return f"continue with: {resume_command(ctx)}"


def resume_command(ctx: typer.Context) -> str:
    """`graft train` with this command's data and options as given, and --resume."""
    words = ["graft", "train"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in ("resume", "overwrite"):
            continue
        if param.param_type_name == "argument":
            words.append(str(value))
        elif param.name == "out" or value != param.default:
            if getattr(param, "is_flag", False):
                words.append(param.opts[0] if value else param.secondary_opts[0])
            else:
                words += [param.opts[0], str(value)]
    return shlex.join(words + ["--resume"])
