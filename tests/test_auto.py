"""`auto`: the rule (torch-free), and the measurements on real images."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import graft
from graft.strategies import auto_rule
from graft.strategies.auto_rule import (
    DISTANT_CONFIDENCE,
    Measurements,
    ViewScore,
    accuracy_difference_se,
    accuracy_se,
    choose,
    first_wins,
    keeps_fine_tuning,
)


def _measured(per_class: float, confidence: float | None, probe: float | None = 0.9, imbalance: float = 1.0) -> Measurements:
    return Measurements(num_classes=5, images_per_class=per_class, imbalance=imbalance, imagenet_confidence=confidence, probe_accuracy=probe)


@pytest.mark.parametrize(
    "per_class, confidence, expected",
    [(20, 0.8, "feature-extract"), (5, 0.2, "feature-extract"), (20, 0.2, "lp-ft"), (60, 0.2, "partial"), (500, 0.8, "discriminative"),
     (1000, 0.2, "partial"), (2000, 0.2, "full")],
)
def test_rule_follows_the_size_and_distance_table(per_class, confidence, expected):
    choice = choose(_measured(per_class, confidence))
    assert choice.strategy == expected
    assert str(per_class) in choice.reason and "ImageNet confidence" in choice.reason


def _views(n: int, both: int, only_whole: int, only_center: int, losses: tuple[float, float]) -> tuple[ViewScore, ViewScore]:
    """Two views' scores on `n` images: `both` right in each, then some right in one view only."""
    whole = [True] * both + [True] * only_whole + [False] * only_center
    center = [True] * both + [False] * only_whole + [True] * only_center
    whole += [False] * (n - len(whole))
    center += [False] * (n - len(center))
    return ViewScore(sum(whole) / n, losses[0], tuple(whole)), ViewScore(sum(center) / n, losses[1], tuple(center))


def test_framing_uses_accuracy_beyond_one_standard_error_and_log_loss_within_it():
    # Seed 2 of 20-shot Fashion-MNIST: 0.793 vs 0.795 on 1 000 images (63 and 65 images right in
    # one view only): noise, so the whole frame's lower log-loss wins (it scored 0.824 on test
    # against 0.802 with the crop that the accuracy alone had picked).
    whole, center = _views(1000, 730, 63, 65, (0.5697, 0.6114))
    assert accuracy_difference_se(whole, center) == pytest.approx(0.0113, abs=1e-4)
    assert first_wins(whole, center) == (True, "log-loss")
    # Seed 0: 0.794 vs 0.783 (50 and 39): more than one standard error, so accuracy decides,
    # though the crop's log-loss was a little lower.
    whole, center = _views(1000, 744, 50, 39, (0.6493, 0.6434))
    assert first_wins(whole, center) == (True, "accuracy")
    assert first_wins(center, whole) == (False, "accuracy")
    # Seed 1: an accuracy tie; the whole frame's loss was lower.
    whole, center = _views(1000, 733, 46, 46, (0.6393, 0.6814))
    assert first_wins(whole, center) == (True, "log-loss")
    assert first_wins(center, whole) == (False, "log-loss")
    # The same predictions and the same loss: an exact tie keeps the crop.
    whole, center = _views(6, 5, 0, 0, (0.64, 0.64))
    assert accuracy_difference_se(whole, center) == 0.0
    assert first_wins(whole, center) == (False, "log-loss")


def test_a_fine_tuned_model_is_kept_only_beyond_one_standard_error_over_the_frozen_one():
    # A fine-tuned model one point above the frozen one on 1 000 validation images, within one
    # standard error: the frozen candidate stays, whatever the log-loss says (validation also
    # chose the fine-tuned model's best epoch).
    tuned, frozen = _views(1000, 800, 60, 50, (0.40, 0.55))
    assert accuracy_difference_se(tuned, frozen) == pytest.approx(0.0105, abs=1e-4)
    assert not keeps_fine_tuning(tuned, frozen)
    assert first_wins(tuned, frozen) == (True, "log-loss")  # the framing's rule would have taken it
    # Beyond one standard error: the fine-tuned model is kept; an exact tie keeps the frozen one.
    tuned, frozen = _views(1000, 800, 70, 40, (0.60, 0.50))
    assert keeps_fine_tuning(tuned, frozen) and not keeps_fine_tuning(frozen, tuned)
    tuned, frozen = _views(10, 7, 0, 0, (0.5, 0.5))
    assert not keeps_fine_tuning(tuned, frozen)
    # One accuracy's own standard error, binomial: sqrt(p (1 - p) / n).
    assert accuracy_se(ViewScore(0.9, 0.3, (True,) * 90 + (False,) * 10)) == pytest.approx(0.03)


def _label_set_scores(base: list[float], changes: dict[int, float], loss: float) -> ViewScore:
    """A candidate's label-ranking AP per image: `base`, with the images in `changes` shifted."""
    scores = tuple(min(1.0, max(0.0, x + changes.get(i, 0.0))) for i, x in enumerate(base))
    return ViewScore(sum(scores) / len(scores), loss, scores, auto_rule.LABEL_RANKING_AP)


def test_label_sets_are_compared_by_each_images_ranking_score_by_the_same_rule():
    """Per-image scores in [0, 1] (label-ranking AP): the paired standard error is that of the mean of
    the per-image differences, an image's own that of the mean of the scores, and the rule reads them
    as it reads right/wrong."""
    import statistics

    base = [0.5 + 0.4 * ((7 * i) % 10) / 10 for i in range(100)]  # 0.5 .. 0.86
    frozen = _label_set_scores(base, {}, 0.30)
    # A small gain on 40 of 100 images, none lost: beyond one standard error, the ranking score
    # decides (an image's whole label set may be right at 0.5 for neither).
    steady = _label_set_scores(base, {i: 0.05 for i in range(0, 100, 5)} | {i: 0.05 for i in range(1, 100, 5)}, 0.35)
    differences = [x - y for x, y in zip(steady.image_scores, frozen.image_scores)]
    se = accuracy_difference_se(steady, frozen)
    assert se == pytest.approx(statistics.pstdev(differences) / 100 ** 0.5, abs=1e-12) and 0 < se < 0.01
    assert first_wins(steady, frozen) == (True, "label-ranking AP")
    assert first_wins(frozen, steady) == (False, "label-ranking AP")
    assert keeps_fine_tuning(steady, frozen) and not keeps_fine_tuning(frozen, steady)
    # Large gains and losses that nearly cancel: within one standard error, the log-loss decides
    # for the framing and the pooling, and the frozen candidate stays.
    noisy = _label_set_scores(base, {i: 0.3 for i in range(0, 40, 2)} | {i: -0.25 for i in range(1, 40, 2)}, 0.25)
    assert 0 < noisy.accuracy - frozen.accuracy < accuracy_difference_se(noisy, frozen)
    assert first_wins(noisy, frozen) == (True, "log-loss")
    assert not keeps_fine_tuning(noisy, frozen)
    # One candidate's own standard error: the scores' population standard deviation over sqrt(n).
    assert accuracy_se(frozen) == pytest.approx(statistics.pstdev(frozen.image_scores) / 10, abs=1e-12)


def test_a_label_set_probe_scores_each_validation_image_by_its_label_ranking_ap(multilabel_csv, lite0):
    """Real Fashion-MNIST label sets (top, footwear, dark), half of them validation, a probe on 12
    training images' frozen features of each framing: each validation image scores how well the
    probe ranks its true labels above the others, and the mean is scikit-learn's
    `label_ranking_average_precision_score` of the same probe."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import label_ranking_average_precision_score
    from sklearn.multiclass import OneVsRestClassifier

    from graft.input.multilabel import load_multilabel_dataset
    from graft.models.backbones import with_crop
    from graft.strategies.auto_measure import _holdout_probe_scores, _spread
    from graft.training.features import extract_features

    dataset = load_multilabel_dataset(multilabel_csv, val_fraction=0.5)
    train, val = dataset.train, dataset.val
    rows = _spread(len(train), 12)
    train_labels = np.asarray(train.labels)[rows]
    scores = {}
    for crop in (0.875, 1.0):
        backbone = with_crop(lite0, crop)
        features = [extract_features(backbone, images.paths, images.digests, cache=None).numpy() for images in (train, val)]
        score = scores[crop] = _holdout_probe_scores(features[0][rows], train_labels.tolist(), features[1], val.labels)
        probe = OneVsRestClassifier(LogisticRegression(max_iter=1000)).fit(features[0][rows], train_labels)
        expected = label_ranking_average_precision_score(np.asarray(val.labels), probe.decision_function(features[1]))
        assert score.measure == "label-ranking AP" and len(score.image_scores) == len(val) == 30
        assert score.accuracy == pytest.approx(expected, abs=1e-9) and score.accuracy < 1.0
        assert sum(score.image_scores) / 30 == pytest.approx(score.accuracy)
        # Graded, not right/wrong: an image whose true label ranks below a false one scores between.
        assert any(0.0 < x < 1.0 for x in score.image_scores) and all(0.0 <= x <= 1.0 for x in score.image_scores)
        assert score.loss > 0 and 0 < accuracy_se(score) < 0.1
    assert scores[0.875].image_scores != scores[1.0].image_scores and accuracy_difference_se(scores[1.0], scores[0.875]) > 0


def test_a_label_set_probe_with_no_label_to_rank_ties_every_candidate():
    """A sample where every label is on (or off) for all training images gives the probe nothing
    to fit: it scores every image 1 with no loss, so the candidate holding its place stays."""
    import numpy as np

    from graft.strategies.auto_measure import _holdout_probe_scores

    features = np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32)
    labels = [[1, 0]] * 6
    score = _holdout_probe_scores(features[:6], labels, features[6:], [[1, 0], [0, 1]])
    assert score.measure == "label-ranking AP" and score.image_scores == (1.0, 1.0) and score.loss == 0.0
    assert first_wins(score, score) == (False, "log-loss")


def test_auto_scores_label_sets_by_label_ranking_ap_and_says_so(multilabel_csv, tmp_path, capsys):
    """On real label sets every candidate (probes and the trained model) is scored by its validation
    label-ranking AP, and the records, the console and the report name that measure."""
    import numpy as np
    from sklearn.metrics import label_ranking_average_precision_score

    from _html import parse_page
    from graft.input.images import load_image
    from graft.input.multilabel import load_multilabel_dataset

    run = graft.train(multilabel_csv, out=tmp_path / "auto", strategy="auto", epochs=2, batch_size=16, cache_dir=str(tmp_path / "c"))
    console = " ".join(capsys.readouterr().err.split())
    auto = run.metrics["auto"]
    assert auto["measure"] == auto["framing"]["measure"] == auto["pooling"]["measure"] == "label-ranking AP"
    # The rule's distance thresholds are accuracies of one label per image: no probe accuracy for label sets.
    assert auto["measured"]["probe_accuracy"] is None
    # The kept model's candidate row: its validation label-ranking AP, as scikit-learn computes it
    # from the bundle's logits on the run's validation images.
    val = load_multilabel_dataset(multilabel_csv).val
    logits = graft.load_bundle(run.bundle_dir).logits([load_image(path) for path in val.paths]).numpy()
    kept = next(c for c in auto["candidates"] if c["kind"] == "trained" and c["chosen"])
    assert kept["accuracy"] == pytest.approx(label_ranking_average_precision_score(np.asarray(val.labels), logits), abs=1e-3)
    assert "auto framing: validation probe label-ranking AP" in console
    assert "auto pooling: validation probe label-ranking AP (log-loss)" in console
    section = parse_page(run.run_dir / "report.html").sections["strategy"]
    assert "validation label-ranking AP" in section.text and "validation accuracy" not in section.text


def test_the_pooling_is_measured_at_every_data_size(tmp_path, lite0):
    """52 real images per class (above the lp-ft cell's 50): the grids are measured too."""
    import numpy as np
    import torch

    from graft.config import TrainConfig
    from graft.console import QUIET
    from graft.input.data import load_dataset
    from graft.input.sample_data import load_fashion_mnist, sample_per_class, write_image_folder
    from graft.models.heads import HeadSpec
    from graft.strategies.auto_measure import _measures_pooling
    from graft.strategies.base import TrainContext

    source = load_fashion_mnist("test")
    keep = np.isin(source.labels, [1, 7, 8])
    subset = type(source)(source.name, source.images[keep], source.labels[keep], source.class_names)
    write_image_folder(subset, sample_per_class(subset.labels, 65, np.random.default_rng(3)), tmp_path / "data")
    dataset = load_dataset(tmp_path / "data")
    assert dataset.train.images_per_class() >= auto_rule.LP_FT_PER_CLASS
    config = TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "run"))
    context = TrainContext(config=config, dataset=dataset, backbone=lite0, stages=[], head_spec=HeadSpec("linear", 1280, 3),
                           device=torch.device("cpu"), precision="fp32", cache=None, reporter=QUIET, on_epoch=lambda history: None)
    assert _measures_pooling(context)
    assert not _measures_pooling(dataclasses.replace(context, config=config.replace(pooling="avg")))  # as the user said


@pytest.mark.parametrize("per_class, confidence, pooling", [(5, 0.2, "grid"), (20, 0.2, "grid"), (20, 0.8, "grid"),
                                                       (49, 0.2, "grid"), (20, 0.2, "grid-2"), (8, 0.8, "grid-3")])
def test_few_images_whose_grid_won_keep_the_frozen_grid_without_augmented_views(per_class, confidence, pooling):
    choice = choose(dataclasses.replace(_measured(per_class, confidence), pooling=pooling))
    assert choice.strategy == "feature-extract" and choice.options == {"augment_views": 0}
    assert choice.rule == "few + the grid's layout -> feature-extract" and f"{pooling} pooling" in choice.reason


def test_the_grid_does_not_change_the_choice_for_more_images():
    for per_class, confidence, expected in ((60, 0.2, "partial"), (500, 0.8, "discriminative")):
        for pooling in ("grid", "grid-2", "grid-3"):
            assert choose(dataclasses.replace(_measured(per_class, confidence), pooling=pooling)).strategy == expected


def test_few_distant_images_get_lp_ft_on_the_top_stages_from_cached_prefix_outputs():
    choice = choose(_measured(20, 0.2))
    assert choice.options == {"train_stages": 2, "augment": "strong", "augment_views": 8, "lr_decay": 0.5,
                              "epochs": 12, "patience": 12}
    assert "top 2 stages" in choice.reason and "8 strongly augmented views" in choice.reason


def test_rule_falls_back_to_the_probe_and_weights_imbalanced_classes():
    assert choose(_measured(60, None, probe=0.6)).strategy == "partial"
    assert choose(_measured(60, None, probe=0.95)).strategy == "feature-extract"
    assert choose(_measured(20, 0.8, imbalance=5.0)).options["class_weighting"] == "balanced"


def test_label_sets_are_not_class_weighted_and_counted_per_label():
    measured = Measurements(num_classes=23, images_per_class=175, imbalance=21.9, imagenet_confidence=0.25,
                            probe_accuracy=None, label_sets=True)
    choice = choose(measured)
    assert choice.strategy == "partial" and "class_weighting" not in choice.options
    assert "175 images per label" in choice.reason and "per class" not in choice.reason


# One cell per branch of the rule, and each distance measure: (images per class, ImageNet
# confidence, probe accuracy, pooling) -> (strategy, the rule's cell).
RULE_CELLS = [
    ((20, 0.24, 0.8, "grid-3"), ("feature-extract", "few + the grid's layout -> feature-extract")),
    ((20, 0.62, 0.8, "avg"), ("feature-extract", "small + similar -> feature-extract")),
    ((5, 0.24, 0.8, "avg"), ("feature-extract", "very few + distant -> feature-extract")),
    ((20, 0.24, 0.8, "avg"), ("lp-ft", "few + distant -> lp-ft on the top stages")),
    ((60, 0.24, 0.8, "avg"), ("partial", "small + distant -> partial")),
    ((80, 0.24, 0.8, "grid"), ("partial", "small + distant -> partial")),
    ((500, 0.62, 0.8, "avg"), ("discriminative", "large + similar -> discriminative")),
    ((1000, 0.24, 0.8, "avg"), ("partial", "large + distant, under 2000 per class -> partial")),
    ((2000, 0.24, 0.8, "avg"), ("full", "large + distant -> full")),
    ((60, None, 0.6, "avg"), ("partial", "small + distant -> partial")),
    ((60, None, 0.93, "avg"), ("feature-extract", "small + similar -> feature-extract")),
    ((60, None, None, "avg"), ("partial", "small + distant -> partial")),
]


def _cell(per_class: float, confidence: float | None, probe: float | None, pooling: str) -> Measurements:
    return Measurements(num_classes=10, images_per_class=per_class, imbalance=1.0, imagenet_confidence=confidence,
                        probe_accuracy=probe, pooling=pooling)


@pytest.mark.parametrize("cell, expected", RULE_CELLS)
def test_each_reason_is_one_sentence_of_what_was_measured_on_the_data(cell, expected):
    measured = _cell(*cell)
    choice = choose(measured)
    assert (choice.strategy, choice.rule) == expected
    reason = choice.reason
    assert reason[0].isupper() and reason.endswith(".") and ". " not in reason and ";" not in reason, reason
    # The data's own figures are in it: its size, and what decided beside it (the distance, or
    # the grid that won over the average)...
    per_class, confidence, probe, pooling = cell
    figure = f"{confidence:.2f}" if confidence is not None else (f"{probe:.2f}" if probe is not None else "no measure")
    decided = f"{pooling} pooling" if choice.rule.startswith("few + the grid") else figure
    assert f"{per_class:g} images per class" in reason and decided in reason, reason
    # ...and every number in it is one of them, a threshold of the rule, a setting of the choice or
    # the pooling's name: no benchmark figures.
    thresholds = {f"{getattr(auto_rule, name):g}" for name in ("SMALL_PER_CLASS", "FEW_PER_CLASS", "LP_FT_PER_CLASS",
                                                               "FULL_PER_CLASS", "DISTANT_CONFIDENCE", "DISTANT_PROBE_ACCURACY")}
    settings = {str(value) for value in choice.options.values() if isinstance(value, int)}
    allowed = {f"{per_class:g}", figure, *thresholds, *settings, *re.findall(r"\d+", measured.pooling)}
    assert set(re.findall(r"\d+(?:\.\d+)?", reason)) <= allowed, reason


def test_the_rule_runs_without_torch_or_numpy():
    """`auto_rule` is plain Python: with torch and numpy unimportable it gives the same choices."""
    code = textwrap.dedent("""
        import json, sys
        sys.modules["torch"] = sys.modules["numpy"] = None  # importing either now fails
        from graft.strategies.auto_rule import Measurements, ViewScore, choose, first_wins
        cells = json.loads(sys.argv[1])
        choices = [choose(Measurements(10, n, 1.0, c, p, pooling=pooling)) for n, c, p, pooling in cells]
        within = first_wins(ViewScore(0.5, 0.6, (True, False)), ViewScore(0.5, 0.7, (False, True)))
        beyond = first_wins(ViewScore(0.4, 0.9, (False,) * 6 + (True,) * 4), ViewScore(1.0, 0.1, (True,) * 10))
        ranked = first_wins(ViewScore(0.65, 0.5, (0.75, 0.55), "label-ranking AP"), ViewScore(0.6, 0.4, (0.7, 0.5), "label-ranking AP"))
        print(json.dumps({"choices": [[c.strategy, c.options, c.reason] for c in choices], "first_wins": [within, beyond, ranked]}))
    """)
    cells = [cell for cell, _ in RULE_CELLS]
    src = str(Path(graft.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code, json.dumps(cells)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["choices"] == [[c.strategy, c.options, c.reason] for c in (choose(_cell(*cell)) for cell in cells)]
    assert answer["first_wins"] == [[True, "log-loss"], [False, "accuracy"], [True, "label-ranking AP"]]


def test_auto_measures_real_images_and_says_why(fashion_folder, tmp_path, monkeypatch):
    import graft.strategies.auto_measure as measure_module

    def no_second_probe(*args, **kwargs):
        raise AssertionError("a cross-validated probe was fitted although the framing probe had measured it")

    monkeypatch.setattr(measure_module, "_probe_accuracy", no_second_probe)
    run = graft.train(fashion_folder, out=tmp_path / "auto", strategy="auto", epochs=2, verbose=False, cache_dir=str(tmp_path / "c"))
    auto = run.metrics["auto"]
    measured = auto["measured"]
    assert measured["images_per_class"] == 10 and measured["num_classes"] == 3
    assert measured["image_side"] == 28  # Fashion-MNIST's 28x28 thumbnails
    # Grayscale product thumbnails are far from ImageNet's photos: the pretrained head is unsure.
    assert measured["imagenet_confidence"] < DISTANT_CONFIDENCE
    assert 0.0 <= measured["probe_accuracy"] <= 1.0
    grid = auto["pooling"]["chose"] != "avg"  # measured below
    assert auto["chose"] == "feature-extract" and measured["pooling"] == auto["pooling"]["chose"]
    if grid:  # where the objects sit told the classes apart: the frozen grid, no augmented views
        assert auto["rule"] == "few + the grid's layout -> feature-extract" and auto["options"] == {"augment_views": 0}
    else:
        assert auto["rule"] == "very few + distant -> feature-extract" and auto["options"] == {"augment_views": 2}
    # Framing: a probe per view (the backbone's 0.875 crop, the whole frame), scored on validation.
    framing = auto["framing"]
    assert framing["center_crop"] == 0.875 and framing["images"] == [30, 6]
    assert all(0.0 <= framing[k] <= 1.0 for k in ("center_accuracy", "full_accuracy"))
    assert all(framing[k] > 0.0 for k in ("center_loss", "full_loss"))
    # The recorded figures and the one-standard-error rule give the recorded choice.
    difference, se = framing["full_accuracy"] - framing["center_accuracy"], framing["accuracy_difference_se"]
    if framing["decided_by"] == "accuracy":
        assert abs(difference) > se - 1e-4
        expected_crop = 1.0 if difference > 0 else 0.875
    else:
        assert framing["decided_by"] == "log-loss" and abs(difference) <= se + 1e-4
        expected_crop = 1.0 if framing["full_loss"] < framing["center_loss"] else 0.875
    assert framing["crop_pct"] == expected_crop
    # The chosen view's validation probe is the reported probe accuracy (no second probe fitted).
    assert measured["probe_accuracy"] == framing["full_accuracy" if expected_crop == 1.0 else "center_accuracy"]
    # The bundle records the view the head was trained on, so predict sees what training saw.
    bundle = graft.load_bundle(run.bundle_dir)
    assert bundle.preprocessing.crop_pct == expected_crop
    # Pooling: probes on the chosen view's average, its grid and its two- and three-stage grids, by
    # the same rule as a ladder.
    pooling = auto["pooling"]
    assert pooling["images"] == [30, 6] and pooling["grid_size"] == 3
    assert pooling["computed"] == 0  # the framing's passes pooled their maps every way: no pass of its own
    assert list(pooling["accuracy"]) == ["avg", "grid", "grid-2", "grid-3"] and pooling["level_grids"] == [3, 3, 5]
    expected_pooling = "avg"
    for step, challenger in zip(pooling["steps"], ("grid", "grid-2", "grid-3"), strict=True):
        assert (step["challenger"], step["holder"]) == (challenger, expected_pooling)
        difference = pooling["accuracy"][challenger] - pooling["accuracy"][expected_pooling]
        if step["decided_by"] == "accuracy":
            assert abs(difference) > step["accuracy_difference_se"] - 1e-4
            wins = difference > 0
        else:
            assert step["decided_by"] == "log-loss" and abs(difference) <= step["accuracy_difference_se"] + 1e-4
            wins = pooling["loss"][challenger] < pooling["loss"][expected_pooling]
        assert step["won"] == wins
        expected_pooling = challenger if wins else expected_pooling
    assert pooling["chose"] == expected_pooling == bundle.meta["backbone"]["pooling"]
    assert bundle.meta["head"]["in_features"] == {"avg": 1280, "grid": 1280 * 9, "grid-2": (1280 + 192) * 9,
                                                 "grid-3": (1280 + 192) * 9 + 112 * 25}[expected_pooling]
    # The measuring passes' features (training and validation) are the ones feature-extract reads
    # from the cache; only the augmented views are new.
    assert run.metrics["strategy"] == "auto" and run.metrics["features_from_cache"] == 30 + 6
    assert run.metrics["features_computed"] == (0 if grid else 2 * 30)
    # A cache that holds the averages and the grid but not the deeper grids (one an older graft
    # wrote): the framing's passes find the averages and run nothing; the first grid pass that runs
    # pools the later grid as well, so each image goes through the backbone once, not once per grid.
    import shutil

    from graft.models.backbones import load_backbone, with_crop, with_pooling
    from graft.training.features import FeatureCache, backbone_key

    view = with_crop(load_backbone(), expected_crop)
    for missing in ("grid-2", "grid-3"):
        grids = with_pooling(view, missing)
        shutil.rmtree(FeatureCache(tmp_path / "c", backbone_key(grids, grids.preprocessing, bundle.meta["precision"])).folder)
    again = graft.train(fashion_folder, out=tmp_path / "again", strategy="auto", epochs=2, verbose=False, cache_dir=str(tmp_path / "c"))
    assert again.metrics["auto"]["pooling"]["computed"] == 30 + 6
    assert again.metrics["auto"]["pooling"]["chose"] == pooling["chose"]


def test_an_explicit_crop_is_used_everywhere_and_not_measured(fashion_folder, holdout_folder, tmp_path):
    import torch

    from graft.models.backbones import load_backbone, with_crop, with_pooling
    from graft.input.data import load_labelled_folder
    from graft.training.features import extract_features

    run = graft.train(fashion_folder, out=tmp_path / "crop", strategy="auto", epochs=2, crop_pct=1.0, verbose=False, cache_dir=str(tmp_path / "c"))
    assert run.metrics["auto"]["framing"] == {}
    # No framing passes to pool by the grids too: the measurement's pass over the training images
    # and the average's pass over the validation images pool every way; the grids' run nothing.
    assert run.metrics["auto"]["pooling"]["computed"] == 6
    assert 0.0 <= run.metrics["auto"]["measured"]["probe_accuracy"] <= 1.0  # cross-validated: no framing probe
    bundle = graft.load_bundle(run.bundle_dir)
    assert bundle.preprocessing.crop_pct == 1.0
    # The bundle's predictions are its head on whole-frame features, not on center-cropped ones.
    images = load_labelled_folder(holdout_folder)[0]
    backbone = with_pooling(load_backbone(), bundle.meta["backbone"]["pooling"])  # auto measured the pooling
    logits = {}
    for crop in (1.0, 0.875):
        features = extract_features(with_crop(backbone, crop), images.paths, images.digests, cache=None, precision=bundle.precision)
        with torch.no_grad():
            logits[crop] = bundle.model.head(features)
    scores = torch.tensor([p.score for p in bundle.predict(images.paths)])
    whole, cropped = (logits[c].softmax(1).max(1).values for c in (1.0, 0.875))
    assert (scores - whole).abs().max() < (scores - cropped).abs().max()
    with pytest.raises(graft.ConfigError, match="^crop_pct: expected"):
        graft.train(fashion_folder, out=tmp_path / "bad", crop_pct=1.5, verbose=False)


def test_auto_lets_explicit_options_win(fashion_folder, tmp_path):
    run = graft.train(fashion_folder, out=tmp_path / "auto2", strategy="auto", epochs=2, augment_views=1, verbose=False, cache_dir=str(tmp_path / "c"))
    assert run.metrics["auto"]["options"]["augment_views"] == 1  # the user's, not the rule's 2
    assert run.metrics["features_computed"] == 30 and run.metrics["epochs_run"] <= 2  # one augmented view
    # An explicit pooling is used as given, not measured.
    run = graft.train(fashion_folder, out=tmp_path / "auto3", strategy="auto", epochs=2, pooling="grid", verbose=False,
                      cache_dir=str(tmp_path / "c"))
    assert run.metrics["auto"]["pooling"] == {}
    assert graft.load_bundle(run.bundle_dir).meta["backbone"]["pooling"] == "grid"


def _few_per_class(tmp_path):
    """15 real Fashion-MNIST images per class of three classes (12 train, 3 validation)."""
    import numpy as np

    from graft.input.sample_data import load_fashion_mnist, sample_per_class, write_image_folder

    source = load_fashion_mnist("test")
    keep = np.isin(source.labels, [1, 7, 8])
    subset = type(source)(source.name, source.images[keep], source.labels[keep], source.class_names)
    root = tmp_path / "data"
    write_image_folder(subset, sample_per_class(subset.labels, 15, np.random.default_rng(2)), root)
    return root


def test_auto_runs_lp_ft_on_the_top_stages_for_a_few_distant_images_per_class(tmp_path):
    """15 real Fashion-MNIST images per class (12 train): the lp-ft cell, end to end."""
    root = _few_per_class(tmp_path)
    # The average pinned: where a 3x3 grid wins, few images per class are not fine-tuned at all.
    run = graft.train(root, out=tmp_path / "auto", strategy="auto", epochs=2, pooling="avg", verbose=False, cache_dir=str(tmp_path / "c"))
    auto = run.metrics["auto"]
    assert auto["pooling"] == {} and auto["measured"]["pooling"] == "avg"
    assert auto["measured"]["images_per_class"] == 12
    assert auto["chose"] == "lp-ft" and auto["rule"] == "few + distant -> lp-ft on the top stages"
    assert auto["options"]["train_stages"] == 2 and auto["options"]["epochs"] == 2  # the user's epochs win
    # Beside it the best frozen candidate trained (the chosen view, head only, from the cache), and
    # lp-ft is kept only where it beat that on validation by more than one standard error.
    decision = auto["decision"]
    frozen, tuned = [c for c in auto["candidates"] if c["kind"] == "trained"]
    assert (frozen["name"], tuned["name"]) == ("feature-extract (avg pooling)", "lp-ft (avg pooling)")
    assert decision["accuracy_difference"] == pytest.approx(tuned["accuracy"] - frozen["accuracy"], abs=1e-3)
    kept = "lp-ft" if decision["accuracy_difference"] > decision["accuracy_difference_se"] else "feature-extract"
    assert decision["kept"] == auto["kept"] == kept == "lp-ft" and tuned["chosen"] and not frozen["chosen"]
    assert frozen["trainable_params"] == 1280 * 3 + 3 and tuned["epochs_run"] == 2
    # The report shows what was recorded: the decision, lp-ft's own audit and resolved settings.
    from _html import parse_page

    section = parse_page(run.run_dir / "report.html").sections["strategy"]
    assert decision["why"] in section.text and "(decided by measurement)" not in section.text
    assert "epochs=2" in section.text and "lr=0.003" in section.text and "train_stages=2" in section.text  # lp-ft's own rate
    # The top 2 stages trained on cached outputs of the frozen prefix, with 8 augmented views.
    assert run.metrics["cached_prefix"] == "blocks.4" and run.metrics["augment_views"] == 8
    # The prefix's outputs for the plain view were kept from the framing's full passes (a fresh
    # cache): the prefix ran only over the 8 augmented views.
    train_count, val_count = 12 * 3, 3 * 3
    assert run.metrics["prefix_outputs_kept"] == train_count + val_count == run.metrics["features_from_cache"]
    assert run.metrics["features_computed"] == 8 * train_count
    assert run.metrics["trainable_params"] == 1_652_640 + 1_017_600 + 1280 * 3 + 3
    assert run.metrics["epochs_run"] == 2 and 0.0 <= run.metrics["accuracy"] <= 1.0
    # lp-ft's probe trained on the plain pooled features (cached by auto's measurement); only the
    # fine-tuning phase used the 8 augmented views, which live in the prefix's cache.
    import json

    from graft.models.backbones import load_backbone, with_crop
    from graft.input.data import load_dataset
    from graft.training.features import FeatureCache, backbone_key, item_key

    precision = json.loads((run.run_dir / "config.json").read_text())["resolved"]["precision"]
    backbone = with_crop(load_backbone(), auto["framing"]["crop_pct"])
    pooled = FeatureCache(tmp_path / "c", backbone_key(backbone, backbone.preprocessing, precision))
    train = load_dataset(root).train
    assert len(pooled.get(train.digests)) == len(train)
    augmented = [item_key(d, "strong", view, 0) for d in train.digests for view in range(1, 9)]
    assert pooled.get(augmented) == {}


def test_auto_drops_the_kept_prefix_outputs_when_it_chooses_no_cached_prefix(tmp_path, monkeypatch):
    """auto keeps the prefix's outputs during the framing before it knows the distance; when the
    data proves similar it chooses feature-extract, and nothing of the prefix reaches the cache.
    The measured confidence is raised past the threshold (the rule's input, not the model's)."""
    import dataclasses

    import graft.strategies.auto as auto_module
    from graft.strategies.base import TrainContext

    real_measure = auto_module.measure
    monkeypatch.setattr(auto_module, "measure", lambda *args, **kwargs: dataclasses.replace(
        real_measure(*args, **kwargs), imagenet_confidence=DISTANT_CONFIDENCE + 0.1))
    taps = []
    real_framing = auto_module.choose_framing

    def framing(context: TrainContext):
        chosen, measured = real_framing(context)
        taps.append(chosen.tap)  # the chosen view's tap, filled by its passes
        return chosen, measured

    monkeypatch.setattr(auto_module, "choose_framing", framing)
    kept_counts = []
    real_choose = auto_module.choose

    def choose(measured):
        if taps:  # the choice after the framing (the first call sizes the tap before it)
            kept_counts.append(len(taps[0].outputs))
        return real_choose(measured)

    monkeypatch.setattr(auto_module, "choose", choose)
    root = _few_per_class(tmp_path)
    run = graft.train(root, out=tmp_path / "auto", strategy="auto", epochs=2, pooling="avg", verbose=False, cache_dir=str(tmp_path / "c"))
    auto = run.metrics["auto"]
    assert auto["chose"] == "feature-extract" and auto["rule"] == "small + similar -> feature-extract"
    # The framing's passes did keep the prefix's outputs (for the lp-ft of distant data)...
    assert taps[0] is not None and taps[0].module_name == "blocks.4"
    assert len(kept_counts) == 1 and kept_counts[0] == 12 * 3 + 3 * 3
    # ...and let go of them once the choice was made, not held while feature-extract trained...
    assert taps[0].outputs == {}
    # ...nor handed on: feature-extract read the pooled features only, and the cache holds the
    # two framings' pooled features, no prefix outputs.
    assert "prefix_outputs_kept" not in run.metrics and "cached_prefix" not in run.metrics
    assert run.metrics["features_from_cache"] == 12 * 3 + 3 * 3
    assert len(list((tmp_path / "c" / "features").iterdir())) == 2
