"""What `auto` measures on the training and validation images before it chooses (`auto_rule`).

It is cheap: one pass of the frozen backbone over the training images, whose pooled features land
in the feature cache that `feature-extract` reuses, and logistic-regression probes on features.
- images per class (median), number of classes, imbalance (largest / smallest class), image size
  (median shorter side, from the file headers);
- **ImageNet confidence**: the mean top-1 probability the backbone's own pretrained ImageNet
  classifier gives the training images. Photos of ImageNet-like things score high (foolbox's
  ImageNet validation images: 0.73 with EfficientNet-Lite0); grayscale product thumbnails score
  low (Fashion-MNIST: 0.24; CIFAR-10 at 32 px: 0.31). It needs no labels and costs nothing more
  than the features.
- **probe accuracy**: how well the frozen final features already separate the classes: the
  validation accuracy of the framing probe of the chosen view (below) when auto measured the
  framing, else 3-fold cross-validated logistic-regression accuracy on the training features.
  Reported, and the distance measure when the backbone has no ImageNet classifier (weights from a
  file without one). Not measured for label sets, whose probes score label-ranking AP instead.
- **framing** (`choose_framing`): the backbone's evaluation center crop (0.875 for
  EfficientNet-Lite) was made for ImageNet photos with margins around the object. When the object
  fills the frame (product thumbnails, digits, tiles) the crop cuts off real content: on 20-shot
  Fashion-MNIST it costs a probe 3.5 points of test accuracy. auto fits a probe on the training
  features of each view (the backbone's crop, the whole frame) and scores both on the validation
  images (accuracy; for label sets, each image's label-ranking AP); `auto_rule.first_wins` (the
  one-standard-error rule) decides. Only the crop can change;
  mean, std, size and interpolation stay the pretrained config's, and the bundle records the view
  it was trained on.
- **pooling** (`choose_pooling`, at every data size): on the chosen
  view, probes on the backbone's average-pooled features, on a 3x3 grid of its last map, and on
  grids of its last two and three stages' outputs (`graft.models.pooling`), by the same rule as a ladder:
  each wider one must beat the one it challenges. The framing's passes pool their maps every way
  at once, so this costs probes, not passes.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from graft.choices import POOLINGS
from graft.models.backbones import Backbone, with_crop, with_pooling
from graft.models.pooling import GRID_SIZE, LEVEL_GRIDS, earlier_module_names, supports_grid
from graft.strategies.auto_rule import (
    LABEL_RANKING_AP, Measurements, ViewScore, accuracy_difference_se, accuracy_se, first_wins,
)
from graft.strategies.base import TrainContext
from graft.strategies.feature_extract import solve_logistic_regression
from graft.training.features import ExtractionStats, FeatureCache, SidePooling, Tap, backbone_key, extract_features
from graft.training.metrics import label_ranking_precision

FRAMING_SAMPLE = 2000  # at most this many training (and validation) images measure the framing and pooling

_POOLING_WORDS = {"avg": "the average", "grid": f"a {GRID_SIZE}x{GRID_SIZE} grid",
                  "grid-2": f"{GRID_SIZE}x{GRID_SIZE} grids of the last two stages",
                  "grid-3": "grids of the last three stages ({})".format(", ".join(f"{n}x{n}" for n in LEVEL_GRIDS))}


def measure(context: TrainContext, probe_accuracy: float | None = None) -> Measurements:
    """The data's size and balance, and its distance from the backbone's pretraining domain.

    `probe_accuracy`, when the caller measured one on validation images (the framing probe), is
    used as it is; otherwise a 3-fold cross-validated probe on the training features gives it.
    """
    train = context.dataset.train
    counts = [n for n in train.counts().values() if n]
    # The ImageNet classifier reads the average-pooled features, whatever pooling trains.
    backbone = with_pooling(context.backbone, "avg")
    cache = context.cache if backbone is context.backbone else _cache_for(context, backbone)
    with context.reporter.progress("auto: measuring (features)", len(train)) as advance:
        features = extract_features(
            backbone, train.paths, train.digests, cache=cache, precision=context.precision,
            device=context.device, progress=advance, stats=ExtractionStats(), compile=context.compile_backbone, tap=context.tap,
            side_poolings=_grids_on_the_side(context),  # for choose_pooling, next
        )
    confidence = None
    classifier = context.backbone.imagenet_classifier
    if classifier is not None:
        with torch.no_grad():
            confidence = float(classifier(features).softmax(dim=1).max(dim=1).values.mean())
    return Measurements(
        num_classes=len(counts),
        images_per_class=train.images_per_class(),
        imbalance=max(counts) / min(counts),
        imagenet_confidence=confidence,
        probe_accuracy=probe_accuracy if probe_accuracy is not None else _probe_accuracy(features, train.labels, context.config.seed),
        image_side=_median_image_side([train.paths[i] for i in _spread(len(train), FRAMING_SAMPLE)]),
        label_sets=context.dataset.task == "multilabel",
    )


def choose_framing(context: TrainContext) -> tuple[TrainContext, dict[str, Any]]:
    """The backbone's center crop or the whole frame, whichever a probe finds better on validation.

    Returns the context to train in (its backbone's preprocessing and feature cache set to the
    chosen view) and what was measured; an empty dict when nothing was measured (the user gave
    `--crop-pct`, the backbone does not crop, or there are no validation images).
    """
    center = context.backbone.preprocessing.crop_pct
    train, val = context.dataset.train, context.dataset.val
    if context.config.crop_pct is not None or center >= 1.0 or len(val) == 0:
        return context, {}
    train_rows = _spread(len(train), FRAMING_SAMPLE)
    val_rows = _spread(len(val), FRAMING_SAMPLE)
    scores: dict[float, ViewScore] = {}  # crop -> the probe's score on the validation images
    contexts: dict[float, TrainContext] = {}
    for crop in (center, 1.0):
        backbone = with_crop(context.backbone, crop)
        cache = _cache_for(context, backbone)
        # Each view keeps its own prefix outputs: the chosen one's go on with the context.
        tap = Tap(context.tap.module_name) if context.tap is not None and cache is not None else None
        contexts[crop] = TrainContext(**{**context.__dict__, "backbone": backbone, "cache": cache, "tap": tap})
        # The pooling measured next reads this pass's feature maps too (`_grids_on_the_side`).
        scores[crop] = _validation_probe(contexts[crop], f"framing, crop {crop:g}", train_rows, val_rows,
                                         side_poolings=_grids_on_the_side(contexts[crop]))
    full, middle = scores[1.0], scores[center]
    wins, decided_by = first_wins(full, middle)
    chosen = 1.0 if wins else center
    return contexts[chosen], {
        "center_crop": center, "center_accuracy": round(middle.accuracy, 4), "full_accuracy": round(full.accuracy, 4),
        "center_loss": round(middle.loss, 4), "full_loss": round(full.loss, 4),
        "center_se": round(accuracy_se(middle), 4), "full_se": round(accuracy_se(full), 4),
        "accuracy_difference_se": round(accuracy_difference_se(full, middle), 4), "decided_by": decided_by,
        "chose": "the whole frame (crop 1)" if chosen == 1.0 else f"the backbone's center crop ({center:g})",
        "crop_pct": chosen, "images": [len(train_rows), len(val_rows)], "measure": full.measure,
    }


def describe_framing(measured: dict[str, Any]) -> str:
    """One line of what `choose_framing` measured and why it chose."""
    return (
        f"auto framing: validation probe {measured.get('measure', 'accuracy')} {measured['center_accuracy']:.3f} "
        f"with the backbone's {measured['center_crop']:g} center crop, {measured['full_accuracy']:.3f} with the whole frame "
        f"(standard error of the difference {measured['accuracy_difference_se']:.3f}; log-loss "
        f"{measured['center_loss']:.3f} vs {measured['full_loss']:.3f}); {measured['decided_by']} chose {measured['chose']}"
    )


def chosen_view_accuracy(measured: dict[str, Any]) -> float | None:
    """The validation accuracy of the probe on the view `choose_framing` chose (None: not measured,
    or label sets, whose probes score label-ranking AP and not the accuracy the rule's thresholds read)."""
    if not measured or measured.get("measure", "accuracy") != "accuracy":
        return None
    return measured["full_accuracy" if measured["crop_pct"] == 1.0 else "center_accuracy"]


def choose_pooling(context: TrainContext) -> tuple[TrainContext, dict[str, Any]]:
    """What the head reads: the backbone's global average, a grid of its last map, or grids of its
    last two or three stages' outputs (`graft.models.pooling`), whichever a probe finds better on validation.

    A ladder by the framing's rule (`first_wins`): the average holds until the grid beats it by
    more than a standard error of the difference in accuracy (or, within it, by a lower log-loss);
    then `grid-2` must beat the holder the same way, then `grid-3`. The later rung is the wider, so
    each must show a measured gain over what is simpler.

    Returns the context to train in (backbone, feature cache and head width of the chosen pooling)
    and what was measured; an empty dict when nothing was measured (`_measures_pooling`). It costs
    no pass of the backbone where the framing's passes pooled their maps every way as well
    (`_grids_on_the_side`); otherwise the first pass that runs pools by every later pooling too.
    """
    if not _measures_pooling(context):
        return context, {}
    train_rows = _spread(len(context.dataset.train), FRAMING_SAMPLE)
    val_rows = _spread(len(context.dataset.val), FRAMING_SAMPLE)
    scores: dict[str, ViewScore] = {}
    contexts: dict[str, TrainContext] = {}
    stats = ExtractionStats()
    for pooling in _pooling_candidates(context):  # the average first: its pass, if it runs, pools every way
        backbone = with_pooling(context.backbone, pooling)
        contexts[pooling] = replace(context, backbone=backbone, cache=_cache_for(context, backbone),
                                    head_spec=replace(context.head_spec, in_features=backbone.num_features))
        # The prefix's outputs, if kept, came with the framing's passes: none to keep here.
        scores[pooling] = _validation_probe(replace(contexts[pooling], tap=None), f"pooling, {pooling}", train_rows, val_rows,
                                            side_poolings=_grids_on_the_side(context, pooling),
                                            stats=stats)
    chosen, steps = "avg", []
    for challenger in list(scores)[1:]:
        wins, decided_by = first_wins(scores[challenger], scores[chosen])
        steps.append({"challenger": challenger, "holder": chosen, "decided_by": decided_by, "won": wins,
                      "accuracy_difference_se": round(accuracy_difference_se(scores[challenger], scores[chosen]), 4)})
        if wins:
            chosen = challenger
    return contexts[chosen], {
        "accuracy": {p: round(score.accuracy, 4) for p, score in scores.items()},
        "loss": {p: round(score.loss, 4) for p, score in scores.items()},
        "standard_error": {p: round(accuracy_se(score), 4) for p, score in scores.items()},
        "steps": steps, "grid_size": GRID_SIZE, "level_grids": list(LEVEL_GRIDS), "chose": chosen,
        "images": [len(train_rows), len(val_rows)], "measure": scores["avg"].measure,
        "computed": stats.computed,  # images the backbone ran for it (none where the framing's passes pooled every way)
    }


def describe_pooling(measured: dict[str, Any]) -> str:
    """One line of what `choose_pooling` measured and why it chose."""
    accuracy, loss = measured["accuracy"], measured["loss"]
    scores = ", ".join(f"{accuracy[p]:.3f} ({loss[p]:.3f}) with {_POOLING_WORDS[p]}" for p in accuracy)
    steps = "; ".join(
        f"{step['challenger']} {'beat' if step['won'] else 'did not beat'} {step['holder']} by {step['decided_by']} "
        f"(standard error of the difference {step['accuracy_difference_se']:.3f})" for step in measured["steps"]
    )
    measure = measured.get("measure", "accuracy")  # label-ranking AP for label sets
    return f"auto pooling: validation probe {measure} (log-loss) {scores}; {steps}: chose {measured['chose']}"


def _pooling_candidates(context: TrainContext) -> tuple[str, ...]:
    """The poolings auto compares, simplest first: `grid-2` and `grid-3` where the backbone has them."""
    return tuple(p for p in POOLINGS if earlier_module_names(context.backbone.model, p) is not None)


def _measures_pooling(context: TrainContext) -> bool:
    """Whether auto compares the average with the grids: no `--pooling` given, a backbone that can
    pool by a grid (`graft.models.pooling.supports_grid`) and validation images to score on."""
    return context.config.pooling is None and supports_grid(context.backbone.model) and len(context.dataset.val) > 0


def _grids_on_the_side(context: TrainContext, pooling: str | None = None) -> tuple[SidePooling, ...]:
    """For a pass of `context`'s backbone pooled by `pooling` (None: as it is), where auto will
    measure the pooling: the poolings `choose_pooling` measures after that one, of the same
    feature maps, cached where it looks for them (nothing without a feature cache to hand them
    over through). The framing's passes are the average's and so pool every grid; in
    `choose_pooling` a grid's pass runs only for images whose features no earlier pass cached, and
    it pools the later grids as well, so the images go through the backbone once however many of
    the caches miss them."""
    candidates = _pooling_candidates(context)
    pooling = pooling or context.backbone.pooling
    if context.cache is None or pooling not in candidates or not _measures_pooling(context):
        return ()
    return tuple(
        SidePooling(later, _cache_for(context, with_pooling(context.backbone, later)),
                    earlier_module_names(context.backbone.model, later) or ())
        for later in candidates[candidates.index(pooling) + 1:]
    )


def _cache_for(context: TrainContext, backbone: Backbone) -> FeatureCache | None:
    """The feature cache of `backbone` (another view or pooling of the context's) in the same folder."""
    return FeatureCache(context.cache.root, backbone_key(backbone, backbone.preprocessing, context.precision)) if context.cache else None


def _validation_probe(context: TrainContext, what: str, train_rows: list[int], val_rows: list[int],
                      side_poolings: tuple[SidePooling, ...] = (), stats: ExtractionStats | None = None) -> ViewScore:
    """The validation score of a probe fitted on `context`'s features of the sampled training images
    (`side_poolings`: other poolings of the same passes' maps, cached for later)."""
    train, val = context.dataset.train, context.dataset.val
    features = {}
    for name, images, rows in (("training", train, train_rows), ("validation", val, val_rows)):
        with context.reporter.progress(f"auto: {what} ({name})", len(rows)) as advance:
            features[name] = extract_features(
                context.backbone, [images.paths[i] for i in rows], [images.digests[i] for i in rows], cache=context.cache,
                precision=context.precision, device=context.device, progress=advance, compile=context.compile_backbone,
                tap=context.tap, side_poolings=side_poolings, stats=stats,
            ).numpy()
    return _holdout_probe_scores(
        features["training"], [train.labels[i] for i in train_rows], features["validation"], [val.labels[i] for i in val_rows]
    )


def _spread(count: int, limit: int) -> list[int]:
    """Up to `limit` indices spread evenly over `range(count)` (every class stays represented)."""
    if count <= limit:
        return list(range(count))
    return [round(i * (count - 1) / (limit - 1)) for i in range(limit)]


def _holdout_probe_scores(train_features, train_labels, val_features, val_labels) -> ViewScore:
    """The validation score of a probe fitted on the training features."""
    # scikit-learn takes about a second to import; only auto's probes need it.
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    if np.asarray(train_labels).ndim == 2:  # label sets: one probe per label
        return _label_set_probe_scores(train_features, np.asarray(train_labels), val_features, np.asarray(val_labels))
    probe = LogisticRegression(max_iter=1000).fit(train_features, train_labels)
    loss = log_loss(val_labels, probe.predict_proba(val_features), labels=probe.classes_)
    correct = (probe.predict(val_features) == np.asarray(val_labels)).astype(float)
    return ViewScore(float(correct.mean()), float(loss), tuple(correct.tolist()))


def _label_set_probe_scores(train_features, train_labels: np.ndarray, val_features, val_labels: np.ndarray) -> ViewScore:
    """The multi-label probe (a binary logistic regression per label at C=1, graft's L-BFGS head:
    `solve_logistic_regression`): each validation image scores its label-ranking average precision
    (`label_ranking_precision`, the probe's logits ranking its labels), and the loss is the mean
    binary cross-entropy over its labels. A label without both a positive and a negative in the
    sample is left out."""
    # All labels at once by L-BFGS: 23 labels on 16 000-wide grid features in seconds, where
    # scikit-learn's one-vs-rest took minutes per pooling on the emoji task.
    varied = (train_labels.min(0) == 0) & (train_labels.max(0) == 1)
    if not varied.any():  # nothing to rank: every candidate ties, and the one holding stays
        return ViewScore(1.0, 0.0, (1.0,) * len(val_labels), LABEL_RANKING_AP)
    train_labels, val_labels = train_labels[:, varied], val_labels[:, varied]
    train_x = torch.as_tensor(train_features, dtype=torch.float32)
    probe = torch.nn.Linear(train_x.shape[1], int(varied.sum()))
    solve_logistic_regression(probe, train_x, torch.as_tensor(train_labels))
    with torch.no_grad():
        logits = probe(torch.as_tensor(val_features, dtype=torch.float32))
    loss = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.as_tensor(val_labels, dtype=torch.float32)))
    precision = label_ranking_precision(val_labels, logits.numpy())
    return ViewScore(float(precision.mean()), loss, tuple(precision.tolist()), LABEL_RANKING_AP)


def _median_image_side(paths) -> float | None:
    """Median shorter side, read from the file headers (nothing is decoded)."""
    sides = []
    for path in paths:
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
        except OSError:  # checked images open; a file changed since is simply not counted
            continue
    return float(statistics.median(sides)) if sides else None


def _probe_accuracy(features: torch.Tensor, labels: list[int], seed: int) -> float | None:
    """3-fold cross-validated accuracy of a probe on the training features (None: a class has
    fewer than two images, or the images carry label sets: the rule's accuracy thresholds are
    those of one label per image)."""
    # scikit-learn takes about a second to import; only auto's probes need it.
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    if labels and isinstance(labels[0], list):
        return None
    folds = min(3, min(Counter(labels).values()))
    if folds < 2:
        return None
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_score(LogisticRegression(max_iter=500), features.numpy(), labels, cv=cv)
    return float(scores.mean())
