"""The public Python API; the CLI is a thin layer over these functions.

    >>> import graft
    >>> run = graft.train("photos/", out="runs/birds")
    >>> run.metrics["accuracy"]
    >>> graft.load_bundle("runs/birds/bundle").predict(["robin.jpg"])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, get_args

from graft.choices import DEFAULT_BACKBONE
from graft.config import TrainConfig
from graft.console import Reporter
from graft.errors import ConfigError, DataError, OutputError
from graft.input.check import CHECK_FILES, DataCheck, run_check, write_check
from graft.input.data import OnBadImage, load_labelled_folder, walk_images
from graft.input.images import IMAGE_EXTENSIONS
from graft.input.multilabel import is_multilabel_csv, load_labelled_sets, load_task_dataset
from graft.models.backbones import load_backbone, with_pooling
from graft.models.heads import HeadSpec, make_head
from graft.models.stages import Stage, discover_stages
from graft.ranges import CLASS_COUNT, check_number
from graft.run import RunResult, labelled_metrics, train_with_config, write_run_report
from graft.run_folder import check_folder, check_writable_folder, claim_folder, read_manifest
from graft.shipping.bundle import Bundle, Prediction, load_bundle
from graft.speed.cpu_precision import choose_cpu_precision
from graft.speed.numerics import resolve_device, resolve_precision
from graft.strategies import AuditRow, get_strategy
from graft.strategies.base import count_params
from graft.training.features import FeatureCache, backbone_key, default_cache_dir

__all__ = [
    "Inspection", "RunResult", "check", "evaluate", "expand_image_paths", "inspect", "predict", "train", "train_with_config",
    "write_run_report",
]


def train(
    data: str | Path, out: str | Path, *, verbose: bool = True, resume: bool = False, overwrite: bool = False, **options: Any
) -> RunResult:
    """Adapt a pretrained backbone to the labelled images in `data`; write the run to `out`.

    Options are the fields of `TrainConfig` (`backbone`, `strategy`, `head`, `epochs`, `lr`,
    `augment_views`, `seed`, ...). Returns the run folder, bundle folder and metrics.
    `out` must be a new or empty folder, or hold a graft run: `resume=True` continues it from its
    last checkpointed epoch (the options must be the run's own), `overwrite=True` replaces it.
    The run's steps are `graft.run.train_with_config`'s.
    """
    config = TrainConfig(data=str(data), out=str(out), **options)
    return train_with_config(config, reporter=Reporter(verbose), resume=resume, overwrite=overwrite)


def check(
    data: str | Path,
    out: str | Path | None = None,
    *,
    backbone: str = DEFAULT_BACKBONE,
    weights: str | Path | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    device: str = "auto",
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
    verbose: bool = True,
) -> DataCheck:
    """Check a labelled folder (or CSV) before training: likely wrong labels, duplicates and
    train/validation leaks, small or imbalanced classes, tiny and grayscale images. A label-set
    CSV is checked for all but wrong labels (`graft.input.check`).

    The split is `graft train`'s for the same `seed` and `val_fraction`; the backbone's frozen
    features come from the feature cache where a run (or an earlier check) computed them.
    With `out`, writes `data_check.csv` and `data_check.json` there (a new or empty folder, or an
    earlier check's with `overwrite=True`: the rules of `graft.run_folder`). The user's files are
    only read. The findings are in `graft.input.check`'s terms.

    >>> result = graft.check("photos/", out="runs/photos-check")  # doctest: +SKIP
    >>> [f.path for f in result.findings if f.issue == "label"]  # doctest: +SKIP
    """
    reporter = Reporter(verbose)
    if out is not None:
        _check_check_folder(Path(out), overwrite)
    cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
    check_writable_folder(cache_root, "--cache-dir")
    dataset = load_task_dataset(data, val_fraction=val_fraction, seed=seed, on_bad_image="skip")
    loaded = load_backbone(backbone, weights=weights)
    where = resolve_device(device)
    precision = resolve_precision("auto", where)
    if precision == "bf16" and where.type == "cpu":  # the precision `graft train` picks here, so its cache serves
        precision = choose_cpu_precision(loaded, cache_root).precision
    cache = FeatureCache(cache_root, backbone_key(loaded, loaded.preprocessing, precision))
    result = run_check(dataset, loaded, cache=cache, precision=precision, device=where, reporter=reporter, seed=seed)
    if out is not None:
        claim_folder(out, kind="check", files=CHECK_FILES, overwrite=overwrite)
        write_check(result, Path(out))
    return result


def _check_check_folder(out: Path, overwrite: bool) -> None:
    """`--out` of a check: graft's run-folder rules, and never a run or comparison, even with --overwrite."""
    owned = read_manifest(out)
    if owned is not None and owned.kind != "check":
        raise OutputError(
            f"--out {out} holds a graft {owned.kind} folder (run id {owned.run_id or 'unknown'}); graft check writes "
            "into a new or empty folder or an earlier check's, and never replaces a run; choose another --out"
        )
    check_folder(out, kind="check", overwrite=overwrite)


def evaluate(bundle: str | Path | Bundle, data: str | Path, *, on_bad_image: str = "error", batch_size: int = 32,
             unknown: str = "auto") -> dict[str, Any]:
    """Metrics of a bundle on a labelled folder (or CSV): the keys of `metrics.json`, and with
    `unknown="auto"` the share of the images the bundle answers "unknown" for (`unknown_rate`)."""
    choices = get_args(OnBadImage)
    if on_bad_image not in choices:
        raise ConfigError(f"--on-bad-image: {on_bad_image!r} is not one of {', '.join(choices)}")
    model = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    label_sets = is_multilabel_csv(Path(data))
    if label_sets != (model.task == "multilabel"):
        raise DataError(
            f"{data}: {'a multi-label CSV (label sets)' if label_sets else 'one label per image'}, but the bundle is "
            f"{'multi-label' if model.task == 'multilabel' else 'single-label'}; evaluate a "
            f"{'multi-label bundle on a path,labels CSV' if model.task == 'multilabel' else 'single-label bundle on class folders or a path,label CSV'}")
    if label_sets:  # mAP and F1 at the bundle's thresholds
        images, bad = load_labelled_sets(Path(data), on_bad_image=on_bad_image)  # type: ignore[arg-type]
    else:
        images, bad = load_labelled_folder(data, on_bad_image=on_bad_image)  # type: ignore[arg-type]
    foreign = sorted(set(images.class_names) - set(model.class_names))
    if foreign:
        raise DataError(
            f"{data}: classes {foreign} are not among the bundle's classes ({', '.join(model.class_names)}); "
            "rename the folders to the bundle's class names or remove them"
        )
    metrics = labelled_metrics(model, images, batch_size=batch_size, unknown=unknown)
    metrics.update(
        backbone=model.backbone,
        strategy=model.meta.get("strategy"),
        bad_images=[{"path": b.path, "reason": b.reason} for b in bad],
    )
    return metrics


def predict(bundle: str | Path | Bundle, paths: Iterable[str | Path], *, top_k: int = 5, batch_size: int = 32,
            threshold: float | None = None, unknown: str = "auto") -> Iterator[Prediction]:
    """Predictions for image files and folders (folders are searched recursively), streamed; a
    multi-label bundle's are label sets (`threshold`: one for every label instead of the stored ones);
    `unknown="off"` never answers "unknown" (`Bundle.predict`)."""
    model = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    return model.iter_predict(expand_image_paths(paths), top_k=top_k, batch_size=batch_size, threshold=threshold, unknown=unknown)


def expand_image_paths(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files as given; folders expanded to their image files (sorted, hidden files skipped).

    A folder that holds no image file (in it or its sub-folders) is a `DataError` naming it,
    raised here, before any image is listed: predicting "nothing" is almost always a wrong path.
    """

    given = [Path(raw) for raw in paths]
    for path in given:
        if path.is_dir() and next(iter(walk_images(path)), None) is None:
            raise DataError(
                f"{path}: no image files in this folder or its sub-folders (graft reads "
                f"{', '.join(sorted(IMAGE_EXTENSIONS))}); give a folder that holds images, or the image files"
            )
    return _expand_image_paths(given)


def _expand_image_paths(paths: list[Path]) -> Iterator[Path]:

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
