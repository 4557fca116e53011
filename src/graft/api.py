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

from graft.models.backbones import DEFAULT_BACKBONE, load_backbone, with_pooling
from graft.shipping.bundle import Bundle, Prediction, load_bundle
from graft.config import TrainConfig
from graft.console import Reporter
from graft.input.data import OnBadImage, load_labelled_folder
from graft.errors import ConfigError, DataError
from graft.models.heads import HeadSpec, make_head
from graft.run import RunResult, labelled_metrics, train_with_config, write_run_report
from graft.models.stages import Stage, discover_stages
from graft.strategies import AuditRow, get_strategy
from graft.strategies.base import count_params

__all__ = [
    "Inspection", "RunResult", "evaluate", "expand_image_paths", "inspect", "predict", "train", "train_with_config",
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


def evaluate(bundle: str | Path | Bundle, data: str | Path, *, on_bad_image: str = "error", batch_size: int = 32,
             unknown: str = "auto") -> dict[str, Any]:
    """Metrics of a bundle on a labelled folder (or CSV): the keys of `metrics.json`, and with
    `unknown="auto"` the share of the images the bundle answers "unknown" for (`unknown_rate`)."""
    choices = get_args(OnBadImage)
    if on_bad_image not in choices:
        raise ConfigError(f"--on-bad-image: {on_bad_image!r} is not one of {', '.join(choices)}")
    model = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
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
            unknown: str = "auto") -> Iterator[Prediction]:
    """Predictions for image files and folders (folders are searched recursively), streamed;
    `unknown="off"` never answers "unknown" (`Bundle.predict`)."""
    model = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    return model.iter_predict(expand_image_paths(paths), top_k=top_k, batch_size=batch_size, unknown=unknown)


def expand_image_paths(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files as given; folders expanded to their image files (sorted, hidden files skipped).

    A folder that holds no image file (in it or its sub-folders) is a `DataError` naming it,
    raised here, before any image is listed: predicting "nothing" is almost always a wrong path.
    """
    from graft.input.data import walk_images
    from graft.input.images import IMAGE_EXTENSIONS

    given = [Path(raw) for raw in paths]
    for path in given:
        if path.is_dir() and next(iter(walk_images(path)), None) is None:
            raise DataError(
                f"{path}: no image files in this folder or its sub-folders (graft reads "
                f"{', '.join(sorted(IMAGE_EXTENSIONS))}); give a folder that holds images, or the image files"
            )
    return _expand_image_paths(given)


def _expand_image_paths(paths: list[Path]) -> Iterator[Path]:
    from graft.input.data import walk_images

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
