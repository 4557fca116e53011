"""`graft train DATA --out RUN`: adapt a backbone to a labelled folder and write the run."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from graft.backbones import DEFAULT_BACKBONE
from graft.cli import Interrupted, options

if TYPE_CHECKING:
    from graft.run_folder import OwnedFolder


def train(
    ctx: typer.Context,
    data: Path = typer.Argument(..., help="Folder with one sub-folder per class (split folders train/, valid/ and a held-out test/ used if present, any case), or a CSV of path,label."),
    out: Path = typer.Option(Path("runs/graft"), "--out", "-o", help="Run folder to write (config, history, metrics, bundle): a new or empty folder, or a graft run to --resume or --overwrite."),
    backbone: str = typer.Option(DEFAULT_BACKBONE, help="Any timm model name; bundled offline: efficientnet_lite0/1/2."),
    weights: Optional[Path] = typer.Option(None, help="Local state-dict file for the backbone (safetensors or torch)."),
    strategy: str = typer.Option("feature-extract", help="Adaptation strategy (see `graft inspect --strategy`)."),
    head: str = typer.Option("linear", help="New classifier head: linear or mlp."),
    hidden: int = typer.Option(512, help="Hidden units of the mlp head."),
    dropout: float = typer.Option(0.0, help="Dropout before the head's last layer."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default: the strategy's; lp-ft: its fine-tuning epochs, its probe trains to its own budget)."),
    batch_size: int = typer.Option(32, help="Training batch size."),
    lr: Optional[float] = options.LR,
    weight_decay: float = typer.Option(1e-4, help="AdamW weight decay."),
    warmup_epochs: int = typer.Option(1, help="Linear warmup before the cosine decay."),
    label_smoothing: float = typer.Option(0.1, help="Label smoothing of the training loss."),
    patience: Optional[int] = typer.Option(None, help="Stop after this many epochs without validation improvement."),
    seed: int = typer.Option(0, help="Seed of the split, the initialisation and the batches."),
    val_fraction: float = typer.Option(0.2, help="Share of each class held out for validation when no valid/ folder exists."),
    on_bad_image: str = typer.Option("error", help="error: stop and list unreadable images; skip: train without them."),
    augment: str = typer.Option("light", help="Training augmentation: none, light or strong."),
    augment_views: Optional[int] = typer.Option(None, help="Augmented views per training image to cache (default: 0 for feature-extract, 4 when a frozen prefix is cached)."),
    train_stages: Optional[int] = options.TRAIN_STAGES,
    lr_decay: float = options.LR_DECAY,
    thaw_every: int = options.THAW_EVERY,
    train_bn: bool = options.TRAIN_BN,
    lora_rank: int = options.LORA_RANK,
    bn_stats: str = options.BN_STATS,
    crop_pct: Optional[float] = typer.Option(None, help="Evaluation crop as a share of the image (1 = whole frame); default: the backbone's own (auto measures both)."),
    pooling: Optional[str] = options.POOLING,
    head_solver: str = typer.Option("auto", help="How a head on cached features is fitted: adamw (epochs, early stopping), lbfgs (linear head: L2-regularised logistic regression solved to convergence), or auto (lbfgs for grid pooling, else adamw)."),
    class_weighting: str = typer.Option("none", help="none or balanced (inverse class frequency)."),
    precision: str = typer.Option("auto", help="auto (bf16 on a GPU that runs it natively; on a CPU with native bf16, whichever of fp32 and bf16 ran the backbone faster, measured once and kept in the cache folder; else fp32), fp32 or bf16. Training in bf16 on a CPU keeps the trained depthwise convolutions in fp32 (faster there)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    compile_mode: str = typer.Option("auto", "--compile", help="torch.compile: on, off, or auto. auto compiles the frozen backbone for extraction on CPU from 50 000 images, and on a GPU the training step when its timed first steps say the run saves more than compiling costs."),
    cache_dir: Optional[Path] = typer.Option(None, help="Feature cache folder (default: $GRAFT_CACHE_DIR or ~/.cache/graft)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out from its last checkpointed epoch (same options)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the graft run in --out: its files are removed first (files graft did not write are never touched)."),
) -> None:
    """Train a classifier on DATA and write the run folder (with its bundle) to --out."""
    from graft.api import train_with_config
    from graft.config import TrainConfig
    from graft.console import Reporter
    from graft.errors import OutputError
    from graft.run_folder import read_manifest

    config = TrainConfig(
        data=str(data), out=str(out), backbone=backbone, weights=str(weights) if weights else None,
        strategy=strategy, head=head, hidden=hidden, dropout=dropout, epochs=epochs,
        batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
        label_smoothing=label_smoothing, patience=patience, seed=seed, val_fraction=val_fraction,
        on_bad_image=on_bad_image, augment=augment, augment_views=augment_views,
        train_stages=train_stages, lr_decay=lr_decay, thaw_every=thaw_every, train_bn=train_bn, lora_rank=lora_rank, bn_stats=bn_stats,
        class_weighting=class_weighting, crop_pct=crop_pct, pooling=pooling, head_solver=head_solver, precision=precision, device=device, compile=compile_mode,
        cache_dir=str(cache_dir) if cache_dir else None,
    )
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
