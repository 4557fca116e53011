"""`auto`'s decision rule: what was measured → which strategy, with which settings, and why.

Pure functions of plain numbers, with no torch or numpy: the measurements come from
`graft.strategies.auto_measure`, and `graft.strategies.auto` runs the choice.

    >>> choice = choose(Measurements(num_classes=10, images_per_class=20, imbalance=1.0,
    ...                              imagenet_confidence=0.24, probe_accuracy=0.79))
    >>> choice.strategy, choice.options["train_stages"]
    ('lp-ft', 2)

The rule starts from the classic table (small/large data × similar/distant domain) and departs
from it where measurements said so; `docs/benchmarks.md` has the figures behind each threshold.
The same file's one-standard-error rule (`first_wins`) decides between two probes scored on the
same validation images: the framing (the backbone's crop or the whole frame) and the pooling; and
`keeps_fine_tuning` decides whether a strategy that trains the backbone is kept over the best frozen
candidate (the measured framing and pooling, head only).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

FROZEN_STRATEGIES = ("feature-extract", "linear-probe")  # the backbone stays as pretrained

SMALL_PER_CLASS = 100  # fewer training images per class than this is "small data"
# Below this many images per class even a distant domain keeps the whole backbone frozen: at 5 per
# class of Fashion-MNIST the frozen features beat every trained strategy (0.768 against 0.742 at
# best), at 20 per class lp-ft on the top stages beat them on the mean of five seeds (0.810 against
# 0.804) and on MNIST-5k (0.915 against 0.879; docs/benchmarks.md). Between 5 and 20
# nothing was measured; the threshold is the middle.
FEW_PER_CLASS = 12
# From FEW_PER_CLASS to this many per class, distant data: lp-ft on the top LP_FT_STAGES stages,
# trained on cached prefix outputs (measured at 20 per class, five seeds of Fashion-MNIST: as
# accurate on average as fine-tuning every stage in a quarter to a third of its time; 0.813 mean
# test accuracy with its probe kept where fine-tuning does not beat it on validation). Below it a
# grid pooling that beat the average (`auto_measure.choose_pooling`) keeps the backbone frozen.
LP_FT_PER_CLASS = 50
LP_FT_STAGES = 2
# Distant data trains only the top stage below this many images per class. Measured on
# Fashion-MNIST (docs/benchmarks.md): at 100 per class `partial` beat `full` by 3.3 points in a
# sixth of the time (0.858 against 0.825); at 1000 per class it beat the frozen features by 3.1
# (0.910 against 0.879), and `full` (0.889), `lp-ft` and `discriminative` (0.875) with 3 epochs
# each (10 epochs: hours on 2 cores). The classic table's `full` is kept from here on, where
# nothing was measured.
FULL_PER_CLASS = 2000
DISTANT_CONFIDENCE = 0.45  # ImageNet confidence below this is a "distant domain"
DISTANT_PROBE_ACCURACY = 0.85  # the distance measure when the backbone has no ImageNet classifier
IMBALANCED = 3.0  # largest / smallest class from which the classes are weighted


@dataclass(frozen=True)
class Measurements:
    """What `auto` measured on the training images (`auto_measure.measure`)."""

    num_classes: int
    images_per_class: float
    imbalance: float  # largest class / smallest class
    imagenet_confidence: float | None  # mean top-1 probability of the backbone's ImageNet classifier
    probe_accuracy: float | None  # a probe's accuracy on the frozen features
    image_side: float | None = None  # median shorter side of the training images, in pixels
    pooling: str = "avg"  # what the head reads: "grid", "grid-2" or "grid-3" where a probe on it won
    # Label sets (multi-label): `images_per_class` is then the median of positives per label and
    # `imbalance` that of the most to the fewest, and no class weighting follows from it.
    label_sets: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Choice:
    """The strategy `auto` trains, its options, the rule's cell, and why, in one sentence."""

    strategy: str
    options: dict[str, Any]
    rule: str  # the cell of the table, e.g. "few + distant -> lp-ft on the top stages"
    reason: str  # one sentence for the user, with what was measured on their data

    @property
    def fine_tunes(self) -> bool:
        """Whether the chosen strategy trains the backbone (and so must beat the frozen candidate)."""
        return self.strategy not in FROZEN_STRATEGIES


def choose(measured: Measurements) -> Choice:
    """The documented rule: data size × domain distance → strategy and its settings.

    A strategy that trains the backbone (`Choice.fine_tunes`) trains on the average-pooled
    features its figures were measured with, and `graft.strategies.auto` keeps it only where it
    beats the best frozen candidate on validation (`keeps_fine_tuning`)."""
    choice = _cell(measured)
    if choice.strategy in FROZEN_STRATEGIES and measured.pooling != "avg":
        # Augmented views move the objects whose place the grid reads (they scored lower under it).
        return replace(choice, options={**choice.options, "augment_views": 0})
    return choice


def _cell(measured: Measurements) -> Choice:
    """The cell of the size × distance table that `measured` falls in."""
    per_class = measured.images_per_class
    distant, distance = _distance(measured)
    # Label sets keep every image's weight: weighting each label's positives by its negatives
    # never raised the emoji task's test mAP (grid-3 head at C=1: 0.802 to 0.787; at C=0.03 0.816
    # to 0.814), and the per-label thresholds chosen on validation already place each label's cut.
    balanced = measured.imbalance >= IMBALANCED and not measured.label_sets
    weighting = {"class_weighting": "balanced"} if balanced else {}
    # 20-shot Fashion-MNIST, five seeds: 0.839 mean test accuracy on the grid auto chose, 0.819 on
    # the last stage's grid alone, 0.813 for lp-ft on the average and 0.816 for lp-ft on the grid
    # (whose augmented views move the objects) in several times the time; augmented views under
    # the grid's head scored lower.
    if measured.pooling != "avg" and per_class < LP_FT_PER_CLASS:
        return Choice("feature-extract", {"augment_views": 0, **weighting}, "few + the grid's layout -> feature-extract",
                      f"With {_count(measured, LP_FT_PER_CLASS)}, the frozen features' {measured.pooling} pooling told "
                      "the classes apart better than their average did on the validation images, so where the objects "
                      "sit matters: the head trains on that frozen grid, with no augmented views to move the objects.")
    if per_class < SMALL_PER_CLASS and not distant:
        return Choice("feature-extract", {"augment_views": 2, **weighting}, "small + similar -> feature-extract",
                      f"With {_count(measured, SMALL_PER_CLASS)} and {distance}, the pretrained features already "
                      "fit: the head trains on them, and training the backbone too would overfit.")
    if per_class < FEW_PER_CLASS:
        return Choice("feature-extract", {"augment_views": 2, **weighting}, "very few + distant -> feature-extract",
                      f"With {_count(measured, FEW_PER_CLASS)} and {distance}, there are too few images to "
                      "re-train a stage for the new domain: the head trains on the frozen features.")
    if per_class < LP_FT_PER_CLASS:
        return Choice("lp-ft", {"train_stages": LP_FT_STAGES, "augment": "strong", "augment_views": 8, "lr_decay": 0.5,
                                "epochs": 12, "patience": 12, **weighting},
                      "few + distant -> lp-ft on the top stages",
                      f"With {_count(measured, LP_FT_PER_CLASS)} and {distance}, a probe on the frozen features "
                      f"trains first, then the top {LP_FT_STAGES} stages fine-tune from its head on cached outputs "
                      "of the frozen prefix with 8 strongly augmented views, and the probe is kept if they do not "
                      "beat it on the validation images.")
    if per_class < SMALL_PER_CLASS:
        stages = 1 if per_class < 75 else 2
        return Choice("partial", {"train_stages": stages, "augment_views": 4, "epochs": 15, "patience": 5, **weighting},
                      "small + distant -> partial",
                      f"With {_count(measured, SMALL_PER_CLASS)} and {distance}, re-training {_top_stages(stages)} "
                      "adapts the backbone to the new domain while the rest stays frozen, its outputs computed once "
                      "per image and cached, with 4 augmented views.")
    if not distant:
        return Choice("discriminative", {"epochs": 10, **weighting}, "large + similar -> discriminative",
                      f"With {_count(measured, SMALL_PER_CLASS)} and {distance}, every stage can adapt a little, "
                      "the early stages least.")
    if per_class < FULL_PER_CLASS:
        return Choice("partial", {"train_stages": 1, "augment_views": 4, **weighting},
                      f"large + distant, under {FULL_PER_CLASS} per class -> partial",
                      f"With {_count(measured, FULL_PER_CLASS)} and {distance}, the top stage adapts to the new "
                      "domain on cached outputs of the frozen rest, which at this size is more accurate than "
                      "fine-tuning every stage and several times faster.")
    return Choice("full", {"epochs": 10, **weighting}, "large + distant -> full",
                  f"With {_count(measured, FULL_PER_CLASS)} and {distance}, there are enough images to move every stage.")


def _distance(measured: Measurements) -> tuple[bool, str]:
    """Whether the data is far from the backbone's pretraining, and the measure that says so."""
    if measured.imagenet_confidence is not None:
        distant = measured.imagenet_confidence < DISTANT_CONFIDENCE
        return distant, (f"an ImageNet confidence of {measured.imagenet_confidence:.2f} "
                         f"({_side(distant, DISTANT_CONFIDENCE)}: {'far from' if distant else 'close to'} ImageNet's photos)")
    if measured.probe_accuracy is not None:
        distant = measured.probe_accuracy < DISTANT_PROBE_ACCURACY
        return distant, (f"a probe accuracy of {measured.probe_accuracy:.2f} on the frozen features "
                         f"({_side(distant, DISTANT_PROBE_ACCURACY)}: {'far from' if distant else 'close to'} "
                         "the backbone's pretraining)")
    return True, "no measure of the distance from the backbone's pretraining (taken as far)"


def _count(measured: Measurements, threshold: float) -> str:
    """The images per class (per label for label sets) said beside the threshold the rule compared them with."""
    per_class = measured.images_per_class
    unit = "images per label" if measured.label_sets else "images per class"
    return f"{per_class:g} {unit} ({_side(per_class < threshold, threshold)})"


def _side(below: bool, threshold: float) -> str:
    return f"under {threshold:g}" if below else f"at least {threshold:g}"


def _top_stages(count: int) -> str:
    return "the top stage" if count == 1 else f"the top {count} stages"


LABEL_RANKING_AP = "label-ranking AP"  # the measure of a candidate on label sets (`ViewScore`)


@dataclass(frozen=True)
class ViewScore:
    """A candidate's score on the validation images: the mean per-image score, the log-loss, and
    each image's score in [0, 1].

    One label per image: an image scores 1 when the top class is right, else 0, and `accuracy` is
    the accuracy. Label sets: an image scores its label-ranking average precision (how far above
    its other labels its true labels rank; `graft.training.metrics.label_ranking_precision`), and
    `accuracy` is scikit-learn's `label_ranking_average_precision_score`.
    """

    accuracy: float  # the mean of `image_scores`
    loss: float
    image_scores: tuple[float, ...]
    measure: str = "accuracy"  # what an image's score is: "accuracy", or LABEL_RANKING_AP for label sets


def accuracy_difference_se(a: ViewScore, b: ViewScore) -> float:
    """Standard error of the difference of two mean scores measured on the same images (paired:
    only the images the two score differently carry the difference). With right/wrong scores it is
    the paired binomial one, where only the images one gets right and the other wrong count."""
    n = len(a.image_scores)
    if n == 0:
        return 0.0
    differences = [x - y for x, y in zip(a.image_scores, b.image_scores)]
    return max(0.0, sum(d * d for d in differences) - sum(differences) ** 2 / n) ** 0.5 / n


def first_wins(challenger: ViewScore, default: ViewScore) -> tuple[bool, str]:
    """The one-standard-error rule: (whether the challenger beats the default, what decided).

    The mean score (`ViewScore.measure`: accuracy, or label-ranking AP for label sets) decides
    when the two differ by more than one standard error of the difference;
    within it the difference is noise (seed 2 of 20-shot Fashion-MNIST: the whole frame 0.793 vs
    the center crop 0.795 on 1 000 images, 2 images apart with a standard error of 11 images), and
    the lower validation log-loss decides, a proper score that uses every image's confidence. Only
    an exact tie keeps the default (for the framing, the backbone's crop; for pooling, the average).
    """
    difference = challenger.accuracy - default.accuracy
    if abs(difference) > accuracy_difference_se(challenger, default):
        return difference > 0, challenger.measure
    return challenger.loss < default.loss, "log-loss"


def accuracy_se(score: ViewScore) -> float:
    """Standard error of one mean score over `len(score.image_scores)` images: the scores' population
    standard deviation over the square root of their count (for right/wrong, the binomial
    sqrt(p (1 - p) / n))."""
    n = len(score.image_scores)
    if n == 0:
        return 0.0
    return (sum((x - score.accuracy) ** 2 for x in score.image_scores) / n) ** 0.5 / n ** 0.5


def keeps_fine_tuning(fine_tuned: ViewScore, frozen: ViewScore) -> bool:
    """Whether a fine-tuned model is kept over the frozen candidate: only if its mean validation
    score (accuracy, or label-ranking AP for label sets) is higher by more than one standard error
    of the paired difference.

    Stricter than `first_wins` (no log-loss within the standard error): the fine-tuned model's
    validation score also chose its best epoch, so it is biased upward, while the frozen
    candidate's head is fitted without looking at validation; within noise the frozen features,
    cheaper and unchanged, stay. On 100-per-class Fashion-MNIST `partial` scored 0.853 on the test
    split and the frozen grids of the last three stages 0.895 (docs/benchmarks.md).
    """
    return fine_tuned.accuracy - frozen.accuracy > accuracy_difference_se(fine_tuned, frozen)
