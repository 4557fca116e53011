"""The public Python API; the CLI is a thin layer over these functions.

    >>> import graft
    >>> run = graft.train("photos/", out="runs/birds")
    >>> run.metrics["accuracy"]
    >>> graft.load_bundle("runs/birds/bundle").predict(["robin.jpg"])
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, get_args

import torch

from graft import distributed
from graft.atomic import write_json, write_text
from graft.backbones import DEFAULT_BACKBONE, load_backbone, with_crop, with_pooling
from graft.bundle import Bundle, Prediction, load_bundle, save_bundle
from graft.config import TrainConfig
from graft.console import QUIET, Reporter
from graft.data import Dataset, LabelledImages, OnBadImage, load_dataset, load_labelled_folder, relative_path
from graft.errors import ConfigError, DataError, TrainingError
from graft.features import FeatureCache, backbone_key, default_cache_dir
from graft.heads import HeadSpec, make_head
from graft.loop import EpochRecord, seed_everything
from graft.metrics import classification_metrics
from graft.numerics import resolve_device, resolve_precision, should_compile
from graft.stages import Stage, discover_stages
from graft.strategies import AuditRow, TrainContext, get_strategy
from graft.strategies.base import count_params, resolve_bn_stats


@dataclass
class RunResult:
    """What `train` produced: where it wrote, and the final validation metrics."""

    run_dir: Path
    bundle_dir: Path
    metrics: dict[str, Any]
    history: list[EpochRecord]

    def load_bundle(self) -> Bundle:
        return load_bundle(self.bundle_dir)


def train(
    data: str | Path, out: str | Path, *, verbose: bool = True, resume: bool = False, overwrite: bool = False, **options: Any
) -> RunResult:
    """Adapt a pretrained backbone to the labelled images in `data`; write the run to `out`.

    Options are the fields of `TrainConfig` (`backbone`, `strategy`, `head`, `epochs`, `lr`,
    `augment_views`, `seed`, ...). Returns the run folder, bundle folder and metrics.
    `out` must be a new or empty folder, or hold a graft run: `resume=True` continues it from its
    last checkpointed epoch (the options must be the run's own), `overwrite=True` replaces it.
    """
    config = TrainConfig(data=str(data), out=str(out), **options)
    return train_with_config(config, reporter=Reporter(verbose), resume=resume, overwrite=overwrite)


def train_with_config(
    config: TrainConfig, *, reporter: Reporter = QUIET, resume: bool = False, overwrite: bool = False
) -> RunResult:
    """`train`, from a ready `TrainConfig` (what `config.json` holds).

    A checkpoint is written to `RUN/checkpoint/` after every epoch and removed when the run is
    done; `resume=True` continues from it (see `graft.checkpoint`). The run folder is graft's
    (`graft.run_folder`): a folder holding anything graft did not write is refused untouched, and
    an earlier run in it is replaced only with `overwrite=True`, its files removed first.
    """
    from graft.checkpoint import check_same_data, prepare_checkpoints
    from graft.preflight import check_options
    from graft.run_folder import RUN_FILES, check_folder, check_writable_folder, claim_folder

    started = time.perf_counter()
    strategy = get_strategy(config.strategy)
    check_options(config)
    run_dir = Path(config.out)
    if distributed.launcher_rank() == 0:  # the other ranks never write, and rank 0 may claim it first
        check_folder(run_dir, kind="run", overwrite=overwrite, resume=resume)
    cache_root = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    check_writable_folder(cache_root, "--cache-dir")
    checkpoints = prepare_checkpoints(config, resume=resume, warn=reporter.warn)
    seed_everything(config.seed)

    dataset = load_dataset(config.data, val_fraction=config.val_fraction, seed=config.seed, on_bad_image=config.on_bad_image)
    if resume:
        check_same_data(run_dir, config.data, dataset.split_record())
    for warning in dataset.warnings:
        reporter.warn(warning)
    for bad in dataset.bad_images:
        reporter.warn(f"skipped {bad.path}: {bad.reason}")
    reporter.say(
        f"data: {len(dataset.class_names)} classes, {len(dataset.train)} training and "
        f"{len(dataset.val)} validation images ({dataset.split} split) from {dataset.root}"
    )
    backbone = load_backbone(config.backbone, weights=config.weights, keep_classifier=config.strategy == "auto")
    reporter.say(f"backbone: {backbone.architecture}, weights from {backbone.weights_source}")
    if config.crop_pct is not None and config.crop_pct != backbone.preprocessing.crop_pct:
        reporter.warn(
            f"--crop-pct {config.crop_pct:g} overrides the backbone's evaluation crop of {backbone.preprocessing.crop_pct:g} "
            "(mean, std, size and interpolation stay the backbone's); the bundle records it"
        )
        backbone = with_crop(backbone, config.crop_pct)
    if config.pooling is not None:
        backbone = with_pooling(backbone, config.pooling)
    device = resolve_device(config.device)
    distributed.setup(device)  # joins torchrun's process group when there is one
    device = distributed.local_device(device)
    main_rank = distributed.is_main()
    if not main_rank:
        reporter = QUIET  # one voice, one set of files: rank 0's
    precision = resolve_precision(config.precision, device)
    precision_measured = None
    if config.precision == "auto" and precision == "bf16" and device.type == "cpu":
        # A CPU with native bf16 may still run this backbone faster in fp32 (graft.cpu_precision).
        # Under torchrun rank 0 decides, for every rank: they must all train in one precision.
        from graft.cpu_precision import choose_cpu_precision

        choice = choose_cpu_precision(backbone, cache_root) if main_rank else None
        if choice is not None:
            reporter.say(
                f"precision auto: {choice.precision} (this CPU ran {backbone.architecture} at {choice.fp32_images_per_second:.0f} "
                f"img/s in fp32 with BatchNorm folded, {choice.bf16_images_per_second:.0f} in bf16; "
                + ("measured now" if choice.measured_now else "measured by an earlier run") + ")"
            )
        precision_measured = distributed.from_main(choice.to_dict() if choice is not None else None)
        precision = precision_measured["precision"]
    compile_backbone = should_compile(config.compile, len(dataset.train) + len(dataset.val), device)
    if compile_backbone:
        reporter.say(f"compiling the frozen backbone's forward (--compile {config.compile}; {len(dataset.train) + len(dataset.val)} images)")
    config_as_given = config
    config = config.replace(bn_stats=resolve_bn_stats(config.bn_stats, dataset.train.images_per_class()))
    stages = discover_stages(backbone.model)
    head_spec = HeadSpec(config.head, backbone.num_features, len(dataset.class_names), config.hidden, config.dropout)
    audit = strategy.audit(backbone.model, stages, make_head(head_spec), config)
    show_audit(reporter, f"strategy {config.strategy}: what trains", audit)

    cache = FeatureCache(cache_root, backbone_key(backbone, backbone.preprocessing, precision))
    if main_rank:
        resolved = {"device": str(device), "precision": precision, "bn_stats": config.bn_stats, "compile": compile_backbone}
        if precision_measured is not None:
            resolved["precision_measured"] = precision_measured
        # An earlier run's files go (with overwrite) before this run's first file is written.
        claim_folder(run_dir, kind="run", files=RUN_FILES, overwrite=overwrite, resume=resume)
        write_json(run_dir / "config.json", {**config_as_given.to_dict(), "resolved": resolved})
        write_json(run_dir / "split.json", dataset.split_record())
    history_path = run_dir / "history.jsonl"

    def record_history(history: list[EpochRecord]) -> None:
        if main_rank:
            write_text(history_path, "".join(json.dumps(r.to_dict()) + "\n" for r in history))

    context = TrainContext(
        config=config, dataset=dataset, backbone=backbone, stages=stages, head_spec=head_spec,
        device=device, precision=precision, cache=cache, reporter=reporter, on_epoch=record_history,
        checkpoint=checkpoints, compile_backbone=compile_backbone,
    )
    try:
        outcome = strategy.train(context)
    except TrainingError as error:
        kept = f"; {checkpoints.folder} keeps the last checkpointed epoch" if checkpoints.folder.is_dir() else ""
        raise TrainingError(f"{run_dir}: {error}{kept}") from None
    train_seconds = time.perf_counter() - started

    predicted = outcome.val_logits.argmax(1).tolist()
    metrics = classification_metrics(dataset.val.labels, predicted, dataset.class_names)
    metrics.update(
        backbone=backbone.architecture,
        strategy=config.strategy,
        num_train=len(dataset.train),
        num_val=len(dataset.val),
        train_seconds=round(train_seconds, 3),
        trainable_params=sum(row.trainable_params for row in audit),  # auto replaces it by its choice's
        total_params=count_params(outcome.model),
        best_epoch=outcome.fit.best_epoch,
        epochs_run=len(outcome.fit.history),
        stopped_early=outcome.fit.stopped_early,
        data=dataset.summary(),
    )
    metrics.update(outcome.notes)  # strategy facts: cache hits, cached prefix, auto's choice
    meta = {
        "backbone": {
            "name": backbone.name,
            "architecture": backbone.architecture,
            "weights_source": backbone.weights_source,
            "weights_id": backbone.weights_id,
            "pooling": outcome.pooling or backbone.pooling,
        },
        "class_names": dataset.class_names,
        "preprocessing": (outcome.preprocessing or backbone.preprocessing).to_dict(),
        "head": (outcome.head_spec or head_spec).to_dict(),
        "strategy": config.strategy,
        "precision": precision,
        "val_accuracy": metrics["accuracy"],
    }
    if outcome.adapters:
        meta["adapters"] = outcome.adapters
    bundle_dir = run_dir / "bundle"
    if main_rank:
        save_bundle(bundle_dir, outcome.model, meta)
        if dataset.test is not None and len(dataset.test):  # the held-out test/ folder, seen only now
            metrics["test"] = labelled_metrics(load_bundle(bundle_dir), dataset.test)
            reporter.say(f"held-out test accuracy {metrics['test']['accuracy']:.3f}, macro-F1 {metrics['test']['macro_f1']:.3f} ({len(dataset.test)} images)")
        write_json(run_dir / "val_predictions.json", validation_predictions(dataset, outcome.val_logits))
        write_json(run_dir / "metrics.json", metrics)
        checkpoints.remove()  # the bundle and metrics are the result now
        write_run_report(run_dir, reporter)
    distributed.barrier()  # no rank returns before the files exist
    if outcome.fit.best_epoch >= 0:
        best = f"best epoch {outcome.fit.best_epoch + 1} of {len(outcome.fit.history)}"
    else:  # lp-ft: no fine-tuning epoch beat the probe it started from
        best = f"no epoch of {len(outcome.fit.history)} beat the starting probe on validation: kept the probe"
    reporter.say(f"validation accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} ({best}); run written to {run_dir}")
    return RunResult(run_dir=run_dir, bundle_dir=bundle_dir, metrics=metrics, history=outcome.fit.history)


def write_run_report(run_dir: Path, reporter: Reporter) -> None:
    """Write the run's report.html; a failure warns instead of costing the finished run."""
    try:
        from graft.report import write_report

        started = time.perf_counter()
        path = write_report(run_dir)
        reporter.say(f"report written to {path} ({time.perf_counter() - started:.1f} s)")
    except Exception as error:  # the report only views the run, which is complete on disk already
        reporter.warn(
            f"{run_dir / 'report.html'}: the report could not be written ({type(error).__name__}: {error}); "
            f"the run itself is complete. Retry with: python -c \"from graft.report import write_report; "
            f"write_report('{run_dir}')\""
        )


def validation_predictions(dataset: Dataset, logits: torch.Tensor) -> list[dict[str, Any]]:
    """One row per validation image: path (relative to the data root), true label, prediction, score."""
    probabilities = logits.softmax(dim=1)
    scores, predicted = probabilities.max(dim=1)
    names = dataset.class_names
    rows = []
    for path, truth, label, score, row in zip(dataset.val.paths, dataset.val.labels, predicted.tolist(), scores.tolist(), probabilities):
        rows.append({
            "path": relative_path(path, dataset.root),
            "true": names[truth],
            "label": names[label],
            "score": round(score, 6),
            "true_score": round(float(row[truth]), 6),
        })
    return rows


def show_audit(reporter: Reporter, title: str, rows: Sequence[AuditRow]) -> None:
    reporter.table(
        title,
        ["stage", "trainable", "total", "lr", "BatchNorm"],
        [
            (r.stage, f"{r.trainable_params:,}", f"{r.total_params:,}", f"{r.lr:.2g}" if r.lr else "-", r.bn_mode)
            for r in rows
        ],
    )


def evaluate(bundle: str | Path | Bundle, data: str | Path, *, on_bad_image: str = "error", batch_size: int = 32) -> dict[str, Any]:
    """Metrics of a bundle on a labelled folder (or CSV): the keys of `metrics.json`."""
    choices = get_args(OnBadImage)
    if on_bad_image not in choices:
        raise ConfigError(f"--on-bad-image: {on_bad_image!r} is not one of {', '.join(choices)}")
    model = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    images, bad = load_labelled_folder(data, on_bad_image=on_bad_image)  # type: ignore[arg-type]
    unknown = sorted(set(images.class_names) - set(model.class_names))
    if unknown:
        raise DataError(
            f"{data}: classes {unknown} are not among the bundle's classes ({', '.join(model.class_names)}); "
            "rename the folders to the bundle's class names or remove them"
        )
    metrics = labelled_metrics(model, images, batch_size=batch_size)
    metrics.update(
        backbone=model.backbone,
        strategy=model.meta.get("strategy"),
        bad_images=[{"path": b.path, "reason": b.reason} for b in bad],
    )
    return metrics


def labelled_metrics(model: Bundle, images: LabelledImages, *, batch_size: int = 32) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class scores and `num_images` of a bundle on labelled images."""
    index = {name: i for i, name in enumerate(model.class_names)}
    truth = [index[images.class_names[y]] for y in images.labels]
    predicted = [model.class_names.index(p.label) for p in model.iter_predict(images.paths, top_k=1, batch_size=batch_size)]
    return {**classification_metrics(truth, predicted, model.class_names), "num_images": len(truth)}


def predict(bundle: str | Path | Bundle, paths: Iterable[str | Path], *, top_k: int = 5, batch_size: int = 32) -> Iterator[Prediction]:
    """Predictions for image files and folders (folders are searched recursively), streamed."""
    model = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    return model.iter_predict(expand_image_paths(paths), top_k=top_k, batch_size=batch_size)


def expand_image_paths(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files as given; folders expanded to their image files (sorted, hidden files skipped).

    A folder that holds no image file (in it or its sub-folders) is a `DataError` naming it,
    raised here, before any image is listed: predicting "nothing" is almost always a wrong path.
    """
    from graft.data import walk_images
    from graft.images import IMAGE_EXTENSIONS

    given = [Path(raw) for raw in paths]
    for path in given:
        if path.is_dir() and next(iter(walk_images(path)), None) is None:
            raise DataError(
                f"{path}: no image files in this folder or its sub-folders (graft reads "
                f"{', '.join(sorted(IMAGE_EXTENSIONS))}); give a folder that holds images, or the image files"
            )
    return _expand_image_paths(given)


def _expand_image_paths(paths: list[Path]) -> Iterator[Path]:
    from graft.data import walk_images

    for path in paths:
        if path.is_dir():
            yield from sorted(walk_images(path))
        else:
            yield path  # a missing or unreadable file is reported by name when it is loaded


@dataclass
class Inspection:
    """What `inspect` found: the backbone's stages and, for a strategy, what would train."""

    architecture: str
    weights_source: str
    preprocessing: dict[str, Any]
    num_features: int
    stages: list[Stage]
    total_params: int
    audit: list[AuditRow] | None


def inspect(
    name: str = DEFAULT_BACKBONE,
    *,
    pretrained: bool = True,
    weights: str | None = None,
    strategy: str | None = None,
    num_classes: int = 2,
    **options: Any,
) -> Inspection:
    """The backbone's stages (name, parameters, channels, stride) and a strategy's audit."""
    from graft.ranges import CLASS_COUNT, check_number

    check_number("num_classes", num_classes, CLASS_COUNT)
    backbone = load_backbone(name, weights=weights, pretrained=pretrained)
    stages = discover_stages(backbone.model)
    audit = None
    if strategy is not None:
        config = TrainConfig(data=".", out=".", backbone=name, strategy=strategy, **options)
        if config.pooling is not None:
            backbone = with_pooling(backbone, config.pooling)
        head = make_head(HeadSpec(config.head, backbone.num_features, num_classes, config.hidden, config.dropout))
        audit = get_strategy(strategy).audit(backbone.model, stages, head, config)
    return Inspection(
        architecture=backbone.architecture,
        weights_source=backbone.weights_source,
        preprocessing=backbone.preprocessing.to_dict(),
        num_features=backbone.num_features,
        stages=stages,
        total_params=count_params(backbone.model),
        audit=audit,
    )
