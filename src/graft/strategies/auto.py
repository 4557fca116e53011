"""`auto`: measure the data and its distance from the backbone's pretraining, then choose.

What it measures (cheap: one pass of the frozen backbone over the training images, whose pooled
features land in the feature cache that `feature-extract` reuses):
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
  file without one).
- **framing**: the backbone's evaluation center crop (0.875 for EfficientNet-Lite) was made for
  ImageNet photos with margins around the object. When the object fills the frame (product
  thumbnails, digits, tiles) the crop cuts off real content: on 20-shot Fashion-MNIST it costs a
  probe 3.5 points of test accuracy. auto fits a probe on the training features of each view (the
  backbone's crop, the whole frame) and scores both probes on the validation images. The view with
  the higher accuracy wins when the difference is larger than its standard error (paired, from the
  images one probe gets right and the other wrong); a smaller difference is noise (on 1 000
  images one standard error is about a point), so the lower validation log-loss decides, and only
  an exact tie keeps the backbone's crop (the one-standard-error rule). Only the crop can change;
  mean, std, size and interpolation stay the pretrained config's, and the bundle records the view
  it was trained on.
- **pooling** (fewer than `LP_FT_PER_CLASS` images per class): on the chosen view, probes on the
  backbone's average-pooled features, on a 3x3 grid of its last map, and on 3x3 grids of its last
  two stages' outputs (`graft.pooling`), by the same rule as a ladder: each wider one must beat
  the one it challenges. Where a grid wins, the rule keeps the frozen grid. The framing's passes
  pool their maps every way at once, so this costs probes, not passes.

The rule starts from the classic table (small/large × similar/distant) and is written out below
in `choose`; `docs/benchmarks.md` has the measurements it was checked against.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from graft.config import TrainConfig
from graft.backbones import Backbone
from graft.features import ExtractionStats, FeatureCache, SidePooling, Tap, backbone_key, extract_features
from graft.pooling import GRID_SIZE, LEVEL_GRIDS
from graft.stages import Stage
from graft.strategies.base import AuditRow, TrainContext, TrainOutcome, with_prefix_tap

SMALL_PER_CLASS = 100  # fewer training images per class than this is "small data"
# Below this many images per class even a distant domain keeps the whole backbone frozen: at 5 per
# class of Fashion-MNIST the frozen features beat every trained strategy (0.768 against 0.742 at
# best), at 20 per class lp-ft on the top stages beat them on the mean of five seeds (0.810 against
# 0.804) and on MNIST-5k (0.915 against 0.879; docs/benchmarks.md). Between 5 and 20
# nothing was measured; the threshold is the middle.
FEW_PER_CLASS = 12
# From FEW_PER_CLASS to this many per class, distant data: lp-ft on the top LP_FT_STAGES stages,
# trained on cached prefix outputs (measured at 20 per class, five seeds of Fashion-MNIST).
LP_FT_PER_CLASS = 50
LP_FT_STAGES = 2
# Distant data trains only the top stage below this many images per class. Measured on
# Fashion-MNIST (docs/benchmarks.md): at 100 per class `partial` beat `full` by 3.3 points in a
# sixth of the time; at 1000 per class it beat the frozen features by 3.1, and `full` (0.889),
# `lp-ft` and `discriminative` (0.875) with 3 epochs each (10 epochs: hours on 2 cores). The
# classic table's `full` is kept from here on, where nothing was measured.
FULL_PER_CLASS = 2000
DISTANT_CONFIDENCE = 0.45  # ImageNet confidence below this is a "distant domain"
DISTANT_PROBE_ACCURACY = 0.85  # fallback when there is no ImageNet classifier
FRAMING_SAMPLE = 2000  # at most this many training (and validation) images measure the framing


@dataclass(frozen=True)
class Measurements:
    num_classes: int
    images_per_class: float
    imbalance: float
    imagenet_confidence: float | None
    probe_accuracy: float | None
    image_side: float | None = None  # median shorter side of the training images, in pixels
    pooling: str = "avg"  # what the head reads: "grid", "grid-2" or "grid-3" where a probe on it won (choose_pooling)

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Choice:
    strategy: str
    options: dict[str, Any]
    rule: str
    reason: str


def choose(measured: Measurements) -> Choice:
    """The documented rule: data size × domain distance → strategy and its settings."""
    small = measured.images_per_class < SMALL_PER_CLASS
    if measured.imagenet_confidence is not None:
        distant = measured.imagenet_confidence < DISTANT_CONFIDENCE
        distance = f"ImageNet confidence {measured.imagenet_confidence:.2f} {'<' if distant else '>='} {DISTANT_CONFIDENCE}"
    elif measured.probe_accuracy is not None:
        distant = measured.probe_accuracy < DISTANT_PROBE_ACCURACY
        distance = f"probe accuracy {measured.probe_accuracy:.2f} {'<' if distant else '>='} {DISTANT_PROBE_ACCURACY} (no ImageNet classifier)"
    else:
        distant, distance = True, "no distance measure available: assumed distant"
    size = f"{measured.images_per_class:g} images per class {'<' if small else '>='} {SMALL_PER_CLASS}"
    imbalance = {"class_weighting": "balanced"} if measured.imbalance >= 3 else {}
    if measured.pooling != "avg" and measured.images_per_class < LP_FT_PER_CLASS:
        return Choice("feature-extract", {"augment_views": 0, **imbalance}, "few + the grid's layout -> feature-extract",
                      f"{measured.images_per_class:g} images per class < {LP_FT_PER_CLASS} and the frozen features' "
                      f"{measured.pooling} pooling separated the classes better than their average: where the objects sit "
                      "matters, and the frozen grid already holds it (measured on 20-shot Fashion-MNIST, five seeds: "
                      "0.839 on average with the grid auto chose, 0.819 with the last stage's grid alone, against 0.813 "
                      "for lp-ft on the averaged features and 0.816 for lp-ft on the grid, whose augmented views move the "
                      "objects, in several times the time; augmented views under the grid's head scored lower)")
    if small and not distant:
        return Choice("feature-extract", {"augment_views": 2, **imbalance}, "small + similar -> feature-extract",
                      f"{size} and {distance}: the pretrained features already fit; training more would overfit")
    if small and distant and measured.images_per_class < FEW_PER_CLASS:
        return Choice("feature-extract", {"augment_views": 2, **imbalance}, "very few + distant -> feature-extract",
                      f"{measured.images_per_class:g} images per class < {FEW_PER_CLASS} and {distance}: too few "
                      "images to re-train a stage for the new domain (measured: on 5-shot Fashion-MNIST the "
                      "frozen features beat partial, lp-ft and full)")
    if small and distant and measured.images_per_class < LP_FT_PER_CLASS:
        return Choice("lp-ft", {"train_stages": LP_FT_STAGES, "augment": "strong", "augment_views": 8, "lr_decay": 0.5,
                                "epochs": 12, "patience": 12, **imbalance},
                      "few + distant -> lp-ft on the top stages",
                      f"{measured.images_per_class:g} images per class < {LP_FT_PER_CLASS} and {distance}: a probe on the "
                      f"frozen features first, then the top {LP_FT_STAGES} stages fine-tune from its head on cached outputs "
                      "of the frozen prefix (8 strongly augmented views); measured on 20-shot Fashion-MNIST over five "
                      "seeds, as accurate on average as fine-tuning every stage in a quarter to a third of its time, and "
                      "better than the frozen features on average (0.810 against 0.804; 0.813 since its probe is kept when "
                      "fine-tuning does not beat it on validation)")
    if small and distant:
        stages = 1 if measured.images_per_class < 75 else 2
        return Choice("partial", {"train_stages": stages, "augment_views": 4, "epochs": 15, "patience": 5, **imbalance},
                      "small + distant -> partial",
                      f"{size} and {distance}: the top stage(s) must adapt to the new domain, the rest is kept; "
                      f"the frozen prefix runs once per image (cached), with 4 augmented views")
    if not distant:
        return Choice("discriminative", {"epochs": 10, **imbalance}, "large + similar -> discriminative",
                      f"{size} and {distance}: every stage can adapt a little, early stages least")
    if measured.images_per_class < FULL_PER_CLASS:
        return Choice("partial", {"train_stages": 1, "augment_views": 4, **imbalance},
                      f"large + distant, under {FULL_PER_CLASS} per class -> partial",
                      f"{size} and {distance}, but {measured.images_per_class:g} < {FULL_PER_CLASS} images per class: "
                      "measured on Fashion-MNIST, re-training the top stage on the cached prefix beat fine-tuning "
                      "everything at 100 per class (0.858 vs 0.825 test accuracy, a sixth of the time) and the "
                      "frozen features at 1000 per class (0.910 vs 0.879)")
    return Choice("full", {"epochs": 10, **imbalance}, "large + distant -> full",
                  f"{size} and {distance}: enough data to move every stage")


class Auto:
    name = "auto"
    default_epochs = 10
    default_lr = 1e-3
    default_patience = 5

    def audit(self, backbone: nn.Module, stages: list[Stage], head: nn.Module, config: TrainConfig) -> list[AuditRow]:
        # What trains is decided after measuring the data; the chosen strategy prints its own.
        rows = [AuditRow(f"{stage.name} (decided by measurement)", 0, stage.num_params, None, "?") for stage in stages]
        head_params = sum(p.numel() for p in head.parameters())
        rows.append(AuditRow("head", head_params, head_params, None, "-"))
        return rows

    def train(self, context: TrainContext) -> TrainOutcome:
        from graft.api import show_audit
        from graft.strategies import get_strategy

        reporter = context.reporter
        # The rule's choice for distant data of this size may train on cached outputs of a frozen
        # prefix; the framing's full passes keep that prefix's outputs (dropped if it is not chosen).
        expected = expected_prefix_end(context)
        if expected is not None:
            context = with_prefix_tap(context, expected)
        context, framing = choose_framing(context)
        if framing:
            reporter.say(
                f"auto framing: validation probe {framing['center_accuracy']:.3f} with the backbone's "
                f"{framing['center_crop']:g} center crop, {framing['full_accuracy']:.3f} with the whole frame "
                f"(standard error of the difference {framing['accuracy_difference_se']:.3f}; log-loss "
                f"{framing['center_loss']:.3f} vs {framing['full_loss']:.3f}); {framing['decided_by']} chose {framing['chose']}"
            )
        # The framing probes were scored on validation already: the chosen view's score is the
        # probe accuracy, and a cross-validated one need not be fitted again (4.5 s of 89 s).
        chosen_accuracy = None
        if framing:
            chosen_accuracy = framing["full_accuracy" if framing["crop_pct"] == 1.0 else "center_accuracy"]
        measured = measure(context, probe_accuracy=chosen_accuracy)
        context, pooling = choose_pooling(context)
        measured = replace(measured, pooling=context.backbone.pooling)
        if pooling:
            reporter.say(describe_pooling(pooling))
        choice = choose(measured)
        reporter.say("auto measured: " + ", ".join(f"{k} {v}" for k, v in measured.to_dict().items()))
        reporter.say(f"auto rule: {choice.rule}; because {choice.reason}")
        options, config = resolve(choice, context.config)
        reporter.say(f"auto chose {choice.strategy} with {options}")
        strategy = get_strategy(choice.strategy)
        from graft.heads import make_head

        audit = strategy.audit(context.backbone.model, context.stages, make_head(context.head_spec), config)
        show_audit(reporter, f"strategy {choice.strategy} (chosen by auto): what trains", audit)
        kept = context.tap if context.tap is not None and expected_prefix_end(context, choice) == context.tap.module_name else None
        if context.tap is not None and kept is None:
            context.tap.outputs.clear()  # a prefix's outputs per image, not to be held while training
        chosen_context = TrainContext(**{**context.__dict__, "config": config, "tap": kept})
        outcome = strategy.train(chosen_context)
        outcome.notes = {**outcome.notes, "trainable_params": sum(row.trainable_params for row in audit), "auto": {
            "measured": measured.to_dict(), "framing": framing, "pooling": pooling, "chose": choice.strategy,
            "options": options, "rule": choice.rule, "reason": choice.reason}}
        outcome.preprocessing = context.backbone.preprocessing
        outcome.pooling, outcome.head_spec = context.backbone.pooling, context.head_spec
        return outcome


def resolve(choice: Choice, config: TrainConfig) -> tuple[dict[str, Any], TrainConfig]:
    """The chosen strategy's options, where the ones the user gave explicitly win, and its config."""
    user_set = {k: getattr(config, k) for k in choice.options if getattr(config, k) != getattr(TrainConfig, k, None)}
    options = {**choice.options, **user_set}
    return options, config.replace(strategy=choice.strategy, **options)


def expected_prefix_end(context: TrainContext, choice: Choice | None = None) -> str | None:
    """Where the frozen prefix ends that `choice`'s strategy trains on from cached outputs; None
    when it trains on none. Without `choice`: the rule's choice if the data proves distant (the
    size and balance are known before any feature is computed; the distance is not)."""
    from graft.strategies import get_strategy
    from graft.strategies.finetune import FineTune, cached_prefix_split

    if choice is None:
        train = context.dataset.train
        counts = [n for n in train.counts().values() if n]
        if not counts:
            return None
        choice = choose(Measurements(num_classes=len(counts), images_per_class=train.images_per_class(),
                                     imbalance=max(counts) / min(counts), imagenet_confidence=0.0, probe_accuracy=0.0,
                                     pooling=context.backbone.pooling))
    strategy = get_strategy(choice.strategy)
    if not isinstance(strategy, FineTune):
        return None
    _, config = resolve(choice, context.config)
    split = cached_prefix_split(context.backbone.model, strategy.full_plan(context.stages, config), context,
                                config.epochs or strategy.default_epochs)
    return split[0].names[-1] if split is not None else None


def choose_framing(context: TrainContext) -> tuple[TrainContext, dict[str, Any]]:
    """The backbone's center crop or the whole frame, whichever a probe finds better on validation.

    Returns the context to train in (its backbone's preprocessing and feature cache set to the
    chosen view) and what was measured; an empty dict when nothing was measured (the user gave
    `--crop-pct`, the backbone does not crop, or there are no validation images).
    """
    from graft.backbones import with_crop

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
        # The pooling measured next reads this pass's feature maps too (`grids_on_the_side`).
        scores[crop] = _validation_probe(contexts[crop], f"framing, crop {crop:g}", train_rows, val_rows,
                                         side_poolings=grids_on_the_side(contexts[crop]))
    full, middle = scores[1.0], scores[center]
    wins, decided_by = first_wins(full, middle)
    chosen = 1.0 if wins else center
    return contexts[chosen], {
        "center_crop": center, "center_accuracy": round(middle.accuracy, 4), "full_accuracy": round(full.accuracy, 4),
        "center_loss": round(middle.loss, 4), "full_loss": round(full.loss, 4),
        "accuracy_difference_se": round(accuracy_difference_se(full, middle), 4), "decided_by": decided_by,
        "chose": "the whole frame (crop 1)" if chosen == 1.0 else f"the backbone's center crop ({center:g})",
        "crop_pct": chosen, "images": [len(train_rows), len(val_rows)],
    }


def choose_pooling(context: TrainContext) -> tuple[TrainContext, dict[str, Any]]:
    """What the head reads: the backbone's global average, a grid of its last map, or grids of its
    last two or three stages' outputs (`graft.pooling`), whichever a probe finds better on validation.

    A ladder by the framing's rule (`first_wins`): the average holds until the grid beats it by
    more than a standard error of the difference in accuracy (or, within it, by a lower log-loss);
    then `grid-2` must beat the holder the same way, then `grid-3`. The later rung is the wider, so
    each must show a measured gain over what is simpler.

    Returns the context to train in (backbone, feature cache and head width of the chosen pooling)
    and what was measured; an empty dict when nothing was measured (`measures_pooling`). It costs
    no pass of the backbone where the framing's passes pooled their maps every way as well
    (`grids_on_the_side`); otherwise the first pass that runs pools by every later pooling too.
    """
    from graft.backbones import with_pooling

    if not measures_pooling(context):
        return context, {}
    train_rows = _spread(len(context.dataset.train), FRAMING_SAMPLE)
    val_rows = _spread(len(context.dataset.val), FRAMING_SAMPLE)
    scores: dict[str, ViewScore] = {}
    contexts: dict[str, TrainContext] = {}
    stats = ExtractionStats()
    for pooling in pooling_candidates(context):  # the average first: its pass, if it runs, pools every way
        backbone = with_pooling(context.backbone, pooling)
        contexts[pooling] = replace(context, backbone=backbone, cache=_cache_for(context, backbone),
                                    head_spec=replace(context.head_spec, in_features=backbone.num_features))
        # The prefix's outputs, if kept, came with the framing's passes: none to keep here.
        scores[pooling] = _validation_probe(replace(contexts[pooling], tap=None), f"pooling, {pooling}", train_rows, val_rows,
                                            side_poolings=grids_on_the_side(context, pooling),
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
        "steps": steps, "grid_size": GRID_SIZE, "level_grids": list(LEVEL_GRIDS), "chose": chosen,
        "images": [len(train_rows), len(val_rows)],
        "computed": stats.computed,  # images the backbone ran for it (none where the framing's passes pooled every way)
    }


def describe_pooling(measured: dict[str, Any]) -> str:
    """One line of what `choose_pooling` measured and why it chose."""
    accuracy, loss = measured["accuracy"], measured["loss"]
    scores = ", ".join(f"{accuracy[p]:.3f} ({loss[p]:.3f}) with {POOLING_WORDS[p]}" for p in accuracy)
    steps = "; ".join(
        f"{step['challenger']} {'beat' if step['won'] else 'did not beat'} {step['holder']} by {step['decided_by']} "
        f"(standard error of the difference {step['accuracy_difference_se']:.3f})" for step in measured["steps"]
    )
    return f"auto pooling: validation probe accuracy (log-loss) {scores}; {steps}: chose {measured['chose']}"


POOLING_WORDS = {"avg": "the average", "grid": f"a {GRID_SIZE}x{GRID_SIZE} grid",
                 "grid-2": f"{GRID_SIZE}x{GRID_SIZE} grids of the last two stages",
                 "grid-3": "grids of the last three stages ({})".format(", ".join(f"{n}x{n}" for n in LEVEL_GRIDS))}


def pooling_candidates(context: TrainContext) -> tuple[str, ...]:
    """The poolings auto compares, simplest first: `grid-2` and `grid-3` where the backbone has them."""
    from graft.pooling import POOLINGS, earlier_module_names

    return tuple(p for p in POOLINGS if earlier_module_names(context.backbone.model, p) is not None)


def measures_pooling(context: TrainContext) -> bool:
    """Whether auto compares the average with the grids: fewer than `LP_FT_PER_CLASS` images per
    class (where the grids were measured), no `--pooling` given, a backbone that can pool by a grid
    (`graft.pooling.supports_grid`) and validation images to score on."""
    from graft.pooling import supports_grid

    return (context.config.pooling is None and context.dataset.train.images_per_class() < LP_FT_PER_CLASS
            and supports_grid(context.backbone.model) and len(context.dataset.val) > 0)


def grids_on_the_side(context: TrainContext, pooling: str | None = None) -> tuple[SidePooling, ...]:
    """For a pass of `context`'s backbone pooled by `pooling` (None: as it is), where auto will
    measure the pooling: the poolings `choose_pooling` measures after that one, of the same
    feature maps, cached where it looks for them (nothing without a feature cache to hand them
    over through). The framing's passes are the average's and so pool every grid; in
    `choose_pooling` a grid's pass runs only for images whose features no earlier pass cached, and
    it pools the later grids as well, so the images go through the backbone once however many of
    the caches miss them."""
    from graft.backbones import with_pooling
    from graft.pooling import earlier_module_names

    candidates = pooling_candidates(context)
    pooling = pooling or context.backbone.pooling
    if context.cache is None or pooling not in candidates or not measures_pooling(context):
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


@dataclass(frozen=True)
class ViewScore:
    """A view's probe on the validation images: accuracy, log-loss, and which images it got right."""

    accuracy: float
    loss: float
    correct: tuple[bool, ...]


def accuracy_difference_se(a: ViewScore, b: ViewScore) -> float:
    """Standard error of the difference of two accuracies measured on the same images (paired:
    only the images one view gets right and the other wrong carry the difference)."""
    n = len(a.correct)
    if n == 0:
        return 0.0
    only_a = sum(x and not y for x, y in zip(a.correct, b.correct))
    only_b = sum(y and not x for x, y in zip(a.correct, b.correct))
    return max(0.0, only_a + only_b - (only_a - only_b) ** 2 / n) ** 0.5 / n


def first_wins(challenger: ViewScore, default: ViewScore) -> tuple[bool, str]:
    """The one-standard-error rule: (whether the challenger beats the default, what decided).

    Accuracy decides when the two differ by more than one standard error of the difference;
    within it the difference is noise (seed 2 of 20-shot Fashion-MNIST: the whole frame 0.793 vs
    the center crop 0.795 on 1 000 images, 2 images apart with a standard error of 11 images), and
    the lower validation log-loss decides, a proper score that uses every image's confidence. Only
    an exact tie keeps the default (for the framing, the backbone's crop; for pooling, the average).
    """
    difference = challenger.accuracy - default.accuracy
    if abs(difference) > accuracy_difference_se(challenger, default):
        return difference > 0, "accuracy"
    return challenger.loss < default.loss, "log-loss"


def _spread(count: int, limit: int) -> list[int]:
    """Up to `limit` indices spread evenly over `range(count)` (every class stays represented)."""
    if count <= limit:
        return list(range(count))
    return [round(i * (count - 1) / (limit - 1)) for i in range(limit)]


def _holdout_probe_scores(train_features, train_labels, val_features, val_labels) -> ViewScore:
    """The validation score of a probe fitted on the training features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    probe = LogisticRegression(max_iter=1000).fit(train_features, train_labels)
    loss = log_loss(val_labels, probe.predict_proba(val_features), labels=probe.classes_)
    correct = probe.predict(val_features) == np.asarray(val_labels)
    return ViewScore(float(correct.mean()), float(loss), tuple(bool(c) for c in correct))


def measure(context: TrainContext, probe_accuracy: float | None = None) -> Measurements:
    """The data's size and balance, and its distance from the backbone's pretraining domain.

    `probe_accuracy`, when the caller measured one on validation images (the framing probe), is
    used as it is; otherwise a 3-fold cross-validated probe on the training features gives it.
    """
    from graft.backbones import with_pooling

    train = context.dataset.train
    counts = [n for n in train.counts().values() if n]
    # The ImageNet classifier reads the average-pooled features, whatever pooling trains.
    backbone = with_pooling(context.backbone, "avg")
    cache = context.cache if backbone is context.backbone else _cache_for(context, backbone)
    with context.reporter.progress("auto: measuring (features)", len(train)) as advance:
        features = extract_features(
            backbone, train.paths, train.digests, cache=cache, precision=context.precision,
            device=context.device, progress=advance, stats=ExtractionStats(), compile=context.compile_backbone, tap=context.tap,
            side_poolings=grids_on_the_side(context),  # for choose_pooling, next
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
    )


def _median_image_side(paths) -> float | None:
    """Median shorter side, read from the file headers (nothing is decoded)."""
    import statistics

    from PIL import Image

    sides = []
    for path in paths:
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
        except OSError:  # checked images open; a file changed since is simply not counted
            continue
    return float(statistics.median(sides)) if sides else None


def _probe_accuracy(features: torch.Tensor, labels: list[int], seed: int) -> float | None:
    from collections import Counter

    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    smallest = min(Counter(labels).values())
    folds = min(3, smallest)
    if folds < 2:
        return None
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_score(LogisticRegression(max_iter=500), features.numpy(), labels, cv=cv)
    return float(scores.mean())
