"""One training run as a recipe of named steps; `graft.train` and `graft train` call it.

`train_with_config` reads top to bottom:

1. `_open_run`: the options checked against the backbone, the run folder checked (read-only), the
   feature cache folder, the checkpoints (and, with `resume`, that the run can be continued);
2. `_build_backbone`: the pretrained backbone with the crop and pooling asked for;
3. `_load_data`: the images, checked at the backbone's size (the check is the first decode of
   each image), split, and with `resume` checked to be the run's own;
4. `_join_ranks`: the device, and torchrun's process group when there is one;
5. `_resolve_numerics`: precision and compilation (`Numerics`);
6. `_plan_strategy`: the options with BatchNorm statistics resolved, the head, and what trains
   (`Plan`), shown as the audit table;
7. `_start_run_files`: the run folder claimed, `config.json` and `split.json` written;
8. `_train`: the strategy trains, recording history and checkpoints after every epoch;
9. `_fit_unknown`: the "none of these" detector, in the trained model's feature space;
   `_measure`: the validation metrics and the run's facts, with the calibration temperature
   fitted on the validation logits;
10. `_check_data`: the data check (`graft.input.check`: likely wrong labels, duplicates and leaks,
    odd classes and images) on the pretrained backbone's features, most of them from the cache
    training filled; `data_check.csv` and `.json` (skipped with `check_data=False`);
11. `_write_run`: bundle, held-out test/ metrics, predictions, metrics, the report last.

Under torchrun every rank runs every step; only rank 0 speaks and writes files (the run folder is
checked and claimed by rank 0 alone, and the last step waits for every rank).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from graft.atomic import write_json, write_text
from graft.config import TrainConfig
from graft.console import QUIET, Reporter, show_audit
from graft.errors import TrainingError
from graft.input.check import DataCheck, run_check, write_check
from graft.input.data import CheckedFiles, Dataset, LabelledImages, relative_path
from graft.input.multilabel import load_task_dataset
from graft.input.pipeline import eval_view_check
from graft.models.backbones import Backbone, load_backbone, with_crop, with_pooling
from graft.models.heads import HeadSpec, make_head
from graft.models.stages import Stage, discover_stages
from graft.preflight import check_options
from graft.report import write_report
from graft.run_folder import RUN_FILES, check_folder, check_writable_folder, claim_folder
from graft.shipping.bundle import Bundle, load_bundle, save_bundle
from graft.shipping.multilabel import labelled_set_metrics
from graft.shipping.unknown import UnknownDetector
from graft.speed.cpu_precision import choose_cpu_precision
from graft.speed.numerics import resolve_device, resolve_precision, should_compile
from graft.strategies import AuditRow, TrainContext, get_strategy
from graft.strategies.base import cache_dir_of, count_params, resolve_bn_stats
from graft.training import distributed, multilabel
from graft.training.calibration import calibration_measures, calibration_summary, fit_temperature
from graft.training.checkpoint import check_same_data, prepare_checkpoints
from graft.training.features import FeatureCache, backbone_key
from graft.training.loop import EpochRecord, seed_everything
from graft.training.metrics import classification_metrics
from graft.training.unknown_fit import fit_run_detector, weights_fingerprint

if TYPE_CHECKING:
    from graft.training.checkpoint import Checkpointer
    from graft.strategies.base import Strategy, TrainOutcome


@dataclass
class RunResult:
    """What `train` produced: where it wrote, and the final validation metrics."""

    run_dir: Path
    bundle_dir: Path
    metrics: dict[str, Any]
    history: list[EpochRecord]

    def load_bundle(self) -> Bundle:
        return load_bundle(self.bundle_dir)


@dataclass(frozen=True)
class RunPlaces:
    """Where a run reads and writes: its folder, the feature cache, its checkpoints."""

    run_dir: Path
    cache_root: Path
    checkpoints: Checkpointer

    @property
    def bundle_dir(self) -> Path:
        return self.run_dir / "bundle"


@dataclass(frozen=True)
class Numerics:
    """How the run computes: device, precision (and the CPU measurement that chose it), compile."""

    device: torch.device
    precision: str
    precision_measured: dict[str, Any] | None
    compile_backbone: bool


@dataclass(frozen=True)
class Plan:
    """What trains: the strategy, the options with `bn_stats` resolved (the options as given are
    what config.json records), the backbone's stages, the head and the audit of it all."""

    strategy: Strategy
    resolved_config: TrainConfig
    stages: list[Stage]
    head_spec: HeadSpec
    audit: list[AuditRow]


def train_with_config(
    config: TrainConfig, *, reporter: Reporter = QUIET, resume: bool = False, overwrite: bool = False
) -> RunResult:
    """`train`, from a ready `TrainConfig` (what `config.json` holds).

    A checkpoint is written to `RUN/checkpoint/` after every epoch and removed when the run is
    done; `resume=True` continues from it (see `graft.training.checkpoint`). The run folder is graft's
    (`graft.run_folder`): a folder holding anything graft did not write is refused untouched, and
    an earlier run in it is replaced only with `overwrite=True`, its files removed first.
    """
    started = time.perf_counter()
    places = _open_run(config, reporter, resume=resume, overwrite=overwrite)
    backbone = _build_backbone(config, reporter)
    dataset = _load_data(config, backbone, places.cache_root, reporter, resume=resume)
    device = _join_ranks(config)
    main_rank = distributed.is_main()
    voice = reporter if main_rank else QUIET  # one voice, one set of files: rank 0's
    numerics = _resolve_numerics(config, backbone, dataset, device, places.cache_root, voice)
    plan = _plan_strategy(config, backbone, dataset, voice)
    if main_rank:
        _start_run_files(config, plan, numerics, dataset, places.run_dir, resume=resume, overwrite=overwrite)
    pretrained = weights_fingerprint(backbone.model)
    outcome = _train(plan, dataset, backbone, numerics, places, voice)
    unknown = _fit_unknown(plan, dataset, backbone, numerics, outcome, places, voice, pretrained=pretrained)
    measured = _measure(plan, dataset, backbone, outcome, train_seconds=time.perf_counter() - started)
    measured["unknown"] = unknown.record() if unknown is not None else None
    checked = _check_data(config, dataset, numerics, places, voice) if config.check_data else None
    if checked is not None:
        measured["data_check"] = checked.counts()
    metrics = _write_run(plan, dataset, backbone, numerics, outcome, measured, places, voice, unknown) if main_rank else measured
    distributed.barrier()  # no rank returns before the files exist
    voice.say(_summary(metrics, outcome, places.run_dir))
    return RunResult(run_dir=places.run_dir, bundle_dir=places.bundle_dir, metrics=metrics, history=outcome.fit.history)


def _open_run(config: TrainConfig, reporter: Reporter, *, resume: bool, overwrite: bool) -> RunPlaces:
    """Check everything that needs no image read: options, run folder, cache folder, checkpoints."""

    check_options(config)
    run_dir = Path(config.out)
    if distributed.launcher_rank() == 0:  # the other ranks never write, and rank 0 may claim it first
        check_folder(run_dir, kind="run", overwrite=overwrite, resume=resume)
    cache_root = cache_dir_of(config)
    check_writable_folder(cache_root, "--cache-dir")
    checkpoints = prepare_checkpoints(config, resume=resume, warn=reporter.warn)
    seed_everything(config.seed)
    return RunPlaces(run_dir=run_dir, cache_root=cache_root, checkpoints=checkpoints)


def _load_data(config: TrainConfig, backbone: Backbone, cache_root: Path, reporter: Reporter, *, resume: bool) -> Dataset:
    """The labelled images and their split; with `resume`, the same images the run started on.

    Each image is checked by decoding it at the backbone's size, and that decode is kept for the
    run's first pass (`eval_view_check`); files unchanged since an earlier run's check are trusted
    from `CheckedFiles` in the cache folder without being read.
    """

    dataset = load_task_dataset(
        config.data, task=config.task, val_fraction=config.val_fraction, seed=config.seed, on_bad_image=config.on_bad_image,
        decode=eval_view_check(backbone.preprocessing), checked=CheckedFiles(cache_root), progress=reporter.progress,
    )
    if resume:
        check_same_data(Path(config.out), config.data, dataset.split_record())
    for warning in dataset.warnings:
        reporter.warn(warning)
    for bad in dataset.bad_images:
        reporter.warn(f"skipped {bad.path}: {bad.reason}")
    reporter.say(
        f"data: {len(dataset.class_names)} classes, {len(dataset.train)} training and "
        f"{len(dataset.val)} validation images ({dataset.split} split) from {dataset.root}"
    )
    return dataset


def _build_backbone(config: TrainConfig, reporter: Reporter) -> Backbone:
    """The pretrained backbone, with `--crop-pct` and `--pooling` applied when given."""
    loaded = load_backbone(config.backbone, weights=config.weights, keep_classifier=config.strategy == "auto")
    reporter.say(f"backbone: {loaded.architecture}, weights from {loaded.weights_source}")
    cropped = loaded
    if config.crop_pct is not None and config.crop_pct != loaded.preprocessing.crop_pct:
        reporter.warn(
            f"--crop-pct {config.crop_pct:g} overrides the backbone's evaluation crop of {loaded.preprocessing.crop_pct:g} "
            "(mean, std, size and interpolation stay the backbone's); the bundle records it"
        )
        cropped = with_crop(loaded, config.crop_pct)
    return with_pooling(cropped, config.pooling) if config.pooling is not None else cropped


def _join_ranks(config: TrainConfig) -> torch.device:
    """The device this process trains on; joins torchrun's process group when there is one."""
    device = resolve_device(config.device)
    distributed.setup(device)
    return distributed.local_device(device)


def _resolve_numerics(
    config: TrainConfig, backbone: Backbone, dataset: Dataset, device: torch.device, cache_root: Path, reporter: Reporter
) -> Numerics:
    """Precision and compilation for this device, data and backbone."""
    precision = resolve_precision(config.precision, device)
    precision_measured = None
    if config.precision == "auto" and precision == "bf16" and device.type == "cpu":
        precision_measured = _measure_cpu_precision(backbone, cache_root, reporter)
    images = len(dataset.train) + len(dataset.val)
    compile_backbone = should_compile(config.compile, images, device)
    if compile_backbone:
        reporter.say(f"compiling the frozen backbone's forward (--compile {config.compile}; {images} images)")
    return Numerics(
        device=device,
        precision=precision_measured["precision"] if precision_measured is not None else precision,
        precision_measured=precision_measured,
        compile_backbone=compile_backbone,
    )


def _measure_cpu_precision(backbone: Backbone, cache_root: Path, reporter: Reporter) -> dict[str, Any]:
    """A CPU with native bf16 may still run this backbone faster in fp32 (graft.speed.cpu_precision).
    Under torchrun rank 0 decides, for every rank: they must all train in one precision."""

    choice = choose_cpu_precision(backbone, cache_root) if distributed.is_main() else None
    if choice is not None:
        reporter.say(
            f"precision auto: {choice.precision} (this CPU ran {backbone.architecture} at {choice.fp32_images_per_second:.0f} "
            f"img/s in fp32 with BatchNorm folded, {choice.bf16_images_per_second:.0f} in bf16; "
            + ("measured now" if choice.measured_now else "measured by an earlier run") + ")"
        )
    return distributed.from_main(choice.to_dict() if choice is not None else None)


def _plan_strategy(config: TrainConfig, backbone: Backbone, dataset: Dataset, reporter: Reporter) -> Plan:
    """The strategy's plan for this backbone and data, printed as the audit table."""
    strategy = get_strategy(config.strategy)
    resolved_config = config.replace(bn_stats=resolve_bn_stats(config.bn_stats, dataset.train.images_per_class()))
    stages = discover_stages(backbone.model)
    head_spec = HeadSpec(config.head, backbone.num_features, len(dataset.class_names), config.hidden, config.dropout)
    audit = strategy.audit(backbone.model, stages, make_head(head_spec), resolved_config)
    show_audit(reporter, f"strategy {config.strategy}: what trains", audit)
    return Plan(strategy=strategy, resolved_config=resolved_config, stages=stages, head_spec=head_spec, audit=audit)


def _start_run_files(
    config: TrainConfig, plan: Plan, numerics: Numerics, dataset: Dataset, run_dir: Path, *, resume: bool, overwrite: bool
) -> None:
    """Claim the run folder (an earlier run's files go first, with `overwrite`), then write
    config.json (the options as given, and what they resolved to) and split.json."""

    resolved: dict[str, Any] = {
        "device": str(numerics.device),
        "precision": numerics.precision,
        "bn_stats": plan.resolved_config.bn_stats,
        "compile": numerics.compile_backbone,
    }
    if numerics.precision_measured is not None:
        resolved["precision_measured"] = numerics.precision_measured
    claim_folder(run_dir, kind="run", files=RUN_FILES, overwrite=overwrite, resume=resume)
    write_json(run_dir / "config.json", {**config.to_dict(), "resolved": resolved})
    write_json(run_dir / "split.json", dataset.split_record())


def _train(plan: Plan, dataset: Dataset, backbone: Backbone, numerics: Numerics, places: RunPlaces, reporter: Reporter) -> TrainOutcome:
    """The strategy trains; history.jsonl is rewritten after every epoch (by rank 0). A failure
    names the run folder and, when one was written, the checkpoint it can resume from."""
    history_path = places.run_dir / "history.jsonl"

    def record_history(history: list[EpochRecord]) -> None:
        if distributed.is_main():
            write_text(history_path, "".join(json.dumps(r.to_dict()) + "\n" for r in history))

    context = TrainContext(
        config=plan.resolved_config, dataset=dataset, backbone=backbone, stages=plan.stages, head_spec=plan.head_spec,
        device=numerics.device, precision=numerics.precision,
        cache=FeatureCache(places.cache_root, backbone_key(backbone, backbone.preprocessing, numerics.precision)),
        reporter=reporter, on_epoch=record_history, checkpoint=places.checkpoints, compile_backbone=numerics.compile_backbone,
    )
    try:
        return plan.strategy.train(context)
    except TrainingError as error:
        folder = places.checkpoints.folder
        kept = f"; {folder} keeps the last checkpointed epoch" if folder.is_dir() else ""
        raise TrainingError(f"{places.run_dir}: {error}{kept}") from None


def _fit_unknown(plan: Plan, dataset: Dataset, backbone: Backbone, numerics: Numerics, outcome: TrainOutcome, places: RunPlaces,
                 reporter: Reporter, *, pretrained: str) -> UnknownDetector | None:
    """The "none of these" detector of the trained model (`graft.training.unknown_fit`): from the
    cached features when its backbone still has the pretrained weights, else from its own. None
    for label sets: its class-conditional score needs one class per image."""
    if dataset.task == "multilabel":
        return None
    model_backbone = outcome.model.backbone
    view = Backbone(name=backbone.name, architecture=backbone.architecture, model=model_backbone,
                    preprocessing=outcome.preprocessing or backbone.preprocessing, weights_source=backbone.weights_source,
                    weights_id=backbone.weights_id, num_features=(outcome.head_spec or plan.head_spec).in_features,
                    pooling=outcome.pooling or backbone.pooling)
    return fit_run_detector(model_backbone, view, dataset, frozen=weights_fingerprint(model_backbone) == pretrained,
                            cache_root=places.cache_root, precision=numerics.precision, device=numerics.device, reporter=reporter)


def _measure(plan: Plan, dataset: Dataset, backbone: Backbone, outcome: TrainOutcome, *, train_seconds: float) -> dict[str, Any]:
    """Validation metrics and the run's facts: the keys of metrics.json but the held-out `test`.

    Single-label: `calibration` holds the temperature fitted on the validation logits (the
    bundle's) and the measures before and after it; `ece`, `nll` and `brier` are those of the
    calibrated scores. Multi-label: mAP, F1 at per-label thresholds chosen on validation."""
    if dataset.task == "multilabel":
        metrics = multilabel.validation_metrics(dataset.val.labels, outcome.val_logits, dataset.class_names)
    else:
        predicted = outcome.val_logits.argmax(1).tolist()
        metrics = classification_metrics(dataset.val.labels, predicted, dataset.class_names)
        calibration = calibration_summary(outcome.val_logits, dataset.val.labels, fit_temperature(outcome.val_logits, dataset.val.labels))
        metrics.update({key: calibration["after"][key] for key in ("ece", "nll", "brier")}, calibration=calibration)
    metrics.update(
        backbone=backbone.architecture,
        strategy=plan.resolved_config.strategy,
        num_train=len(dataset.train),
        num_val=len(dataset.val),
        train_seconds=round(train_seconds, 3),
        trainable_params=sum(row.trainable_params for row in plan.audit),  # auto replaces it by its choice's
        total_params=count_params(outcome.model),
        best_epoch=outcome.fit.best_epoch,
        epochs_run=len(outcome.fit.history),
        stopped_early=outcome.fit.stopped_early,
        data=dataset.summary(),
    )
    metrics.update(outcome.notes)  # strategy facts: cache hits, cached prefix, auto's choice
    return metrics


def _check_data(config: TrainConfig, dataset: Dataset, numerics: Numerics, places: RunPlaces, reporter: Reporter) -> DataCheck:
    """The data check on the pretrained backbone (loaded again: a strategy may have trained the
    one it was given), in the run's view, pooling and precision, so the features training cached
    serve it; rank 0 writes data_check.csv and data_check.json into the run folder."""
    backbone = _build_backbone(config, QUIET)
    cache = FeatureCache(places.cache_root, backbone_key(backbone, backbone.preprocessing, numerics.precision))
    checked = run_check(
        dataset, backbone, cache=cache, precision=numerics.precision, device=numerics.device,
        reporter=reporter, seed=config.seed, compile=numerics.compile_backbone,
    )
    if distributed.is_main():
        write_check(checked, places.run_dir)
    reporter.say(checked.summary() + f"\n  the list: {places.run_dir / 'data_check.csv'} (--no-check-data skips the check)")
    return checked


def _write_run(
    plan: Plan, dataset: Dataset, backbone: Backbone, numerics: Numerics, outcome: TrainOutcome,
    measured: dict[str, Any], places: RunPlaces, reporter: Reporter, unknown: UnknownDetector | None = None,
) -> dict[str, Any]:
    """Write the bundle, then score it on the held-out test/ folder (seen only now), then the
    predictions and metrics; the checkpoint goes and the report is written last. Returns the
    metrics written (`measured`, with `test` when there is a test/ folder)."""
    save_bundle(places.bundle_dir, outcome.model, _bundle_meta(plan, dataset, backbone, numerics, outcome, measured), unknown=unknown)
    metrics = {**measured, **_held_out_metrics(places.bundle_dir, dataset, reporter)}
    temperature = measured.get("calibration", {}).get("temperature", 1.0)
    write_json(places.run_dir / "val_predictions.json", validation_predictions(dataset, outcome.val_logits.float() / temperature, metrics))
    write_json(places.run_dir / "metrics.json", metrics)
    places.checkpoints.remove()  # the bundle and metrics are the result now
    write_run_report(places.run_dir, reporter)
    return metrics


def _held_out_metrics(bundle_dir: Path, dataset: Dataset, reporter: Reporter) -> dict[str, Any]:
    """`{"test": metrics}` of the written bundle on the held-out test/ folder; {} without one."""
    if dataset.test is None or not len(dataset.test):
        return {}
    test = labelled_metrics(load_bundle(bundle_dir), dataset.test)
    reporter.say(f"held-out test accuracy {test['accuracy']:.3f}, macro-F1 {test['macro_f1']:.3f} ({len(dataset.test)} images)")
    return {"test": test}


def _bundle_meta(
    plan: Plan, dataset: Dataset, backbone: Backbone, numerics: Numerics, outcome: TrainOutcome, measured: dict[str, Any]
) -> dict[str, Any]:
    """graft.json's fields: the backbone, view, pooling and head the trained model uses."""
    meta: dict[str, Any] = {
        "backbone": {
            "name": backbone.name,
            "architecture": backbone.architecture,
            "weights_source": backbone.weights_source,
            "weights_id": backbone.weights_id,
            "pooling": outcome.pooling or backbone.pooling,
        },
        "class_names": dataset.class_names,
        "preprocessing": (outcome.preprocessing or backbone.preprocessing).to_dict(),
        "head": (outcome.head_spec or plan.head_spec).to_dict(),
        "strategy": plan.resolved_config.strategy,
        "precision": numerics.precision,
        "val_accuracy": measured["accuracy"],
        "temperature": measured.get("calibration", {}).get("temperature", 1.0),  # label sets: sigmoid, no temperature
    }
    if outcome.adapters:
        meta["adapters"] = outcome.adapters
    if dataset.task == "multilabel":
        meta.update(task="multilabel", thresholds=[row["threshold"] for row in measured["per_class"].values()])
    return meta


def _summary(metrics: dict[str, Any], outcome: TrainOutcome, run_dir: Path) -> str:
    """The run's last line: validation scores, the epoch kept, where the run is."""
    if outcome.fit.best_epoch >= 0:
        best = f"best epoch {outcome.fit.best_epoch + 1} of {len(outcome.fit.history)}"
    else:  # lp-ft: no fine-tuning epoch beat the probe it started from
        best = f"no epoch of {len(outcome.fit.history)} beat the starting probe on validation: kept the probe"
    scores = (f"mAP {metrics['map']:.3f}, micro-F1 {metrics['micro_f1']:.3f}" if metrics.get("task") == "multilabel"
              else f"accuracy {metrics['accuracy']:.3f}")
    return f"validation {scores}, macro-F1 {metrics['macro_f1']:.3f} ({best}); run written to {run_dir}"


def write_run_report(run_dir: Path, reporter: Reporter) -> None:
    """Write the run's report.html; a failure warns instead of costing the finished run."""
    try:

        started = time.perf_counter()
        path = write_report(run_dir)
        reporter.say(f"report written to {path} ({time.perf_counter() - started:.1f} s)")
    except Exception as error:  # the report only views the run, which is complete on disk already
        reporter.warn(
            f"{run_dir / 'report.html'}: the report could not be written ({type(error).__name__}: {error}); "
            f"the run itself is complete. Retry with: python -c \"from graft.report import write_report; "
            f"write_report('{run_dir}')\""
        )


def validation_predictions(dataset: Dataset, logits: torch.Tensor, metrics: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per validation image: path (relative to the data root), true label, prediction, score
    (multi-label: true and predicted label sets, every label's score)."""
    if dataset.task == "multilabel" and metrics is not None:
        thresholds = [row["threshold"] for row in metrics["per_class"].values()]
        paths = [relative_path(p, dataset.root) for p in dataset.val.paths]
        return multilabel.validation_rows(paths, dataset.val.labels, logits, dataset.class_names, thresholds)
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


def labelled_metrics(model: Bundle, images: LabelledImages, *, batch_size: int = 32, unknown: str = "auto") -> dict[str, Any]:
    """Accuracy, macro-F1, per-class scores, `num_images`, and the calibration measures (`ece`,
    `nll`, `brier`) of the bundle's calibrated scores (`temperature`) on labelled images
    (multi-label images: `graft.shipping.multilabel.labelled_set_metrics`).

    The scores are the classifier's (its best class for every image); with the bundle's "none of
    these" check on (`unknown="auto"`), `unknown_rate` is the share of the images it answers
    "unknown" for, and `num_unknown` their count."""
    if getattr(model, "task", "classification") == "multilabel":
        return labelled_set_metrics(model, images.paths, images.labels, images.class_names, batch_size=batch_size)
    index = {name: i for i, name in enumerate(model.class_names)}
    truth = [index[images.class_names[y]] for y in images.labels]
    probabilities = torch.zeros(len(truth), len(model.class_names))
    rejected = 0
    # Every class's probability (top-k of all classes), to measure calibration as well as accuracy.
    stream = model.iter_predict(images.paths, top_k=len(model.class_names), batch_size=batch_size, unknown=unknown)
    for row, prediction in enumerate(stream):
        for label, score in prediction.top_k:
            probabilities[row, index[label]] = score
        rejected += prediction.unknown_score is not None and prediction.unknown_score > model.unknown.threshold
    predicted = probabilities.argmax(1).tolist()
    metrics = {**classification_metrics(truth, predicted, model.class_names), "num_images": len(truth),
               **calibration_measures(probabilities, truth), "temperature": model.temperature}
    if model.unknown is not None and unknown == "auto":
        metrics.update(unknown_rate=rejected / max(len(truth), 1), num_unknown=rejected)
    return metrics
