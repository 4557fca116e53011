"""`auto`: the rule, and the measurements on real images."""

import pytest

import graft
from graft.strategies.auto import DISTANT_CONFIDENCE, Measurements, choose


def _measured(per_class: float, confidence: float | None, probe: float | None = 0.9, imbalance: float = 1.0) -> Measurements:
    return Measurements(num_classes=5, images_per_class=per_class, imbalance=imbalance, imagenet_confidence=confidence, probe_accuracy=probe)


@pytest.mark.parametrize(
    "per_class, confidence, expected",
    [(20, 0.8, "feature-extract"), (20, 0.2, "feature-extract"), (60, 0.2, "partial"), (500, 0.8, "discriminative"), (500, 0.2, "full")],
)
def test_rule_follows_the_size_and_distance_table(per_class, confidence, expected):
    choice = choose(_measured(per_class, confidence))
    assert choice.strategy == expected
    assert str(per_class) in choice.reason and "ImageNet confidence" in choice.reason


def test_rule_falls_back_to_the_probe_and_weights_imbalanced_classes():
    assert choose(_measured(60, None, probe=0.6)).strategy == "partial"
    assert choose(_measured(60, None, probe=0.95)).strategy == "feature-extract"
    assert choose(_measured(20, 0.8, imbalance=5.0)).options["class_weighting"] == "balanced"


def test_auto_measures_real_images_and_says_why(fashion_folder, tmp_path):
    run = graft.train(fashion_folder, out=tmp_path / "auto", strategy="auto", epochs=2, verbose=False, cache_dir=str(tmp_path / "c"))
    auto = run.metrics["auto"]
    measured = auto["measured"]
    assert measured["images_per_class"] == 10 and measured["num_classes"] == 3
    # Grayscale product thumbnails are far from ImageNet's photos: the pretrained head is unsure.
    assert measured["imagenet_confidence"] < DISTANT_CONFIDENCE
    assert 0.0 <= measured["probe_accuracy"] <= 1.0
    assert auto["chose"] == "feature-extract" and auto["rule"] == "few + distant -> feature-extract"
    assert auto["options"] == {"augment_views": 2}
    # The measuring pass's training features are the ones feature-extract then reads from the cache.
    assert run.metrics["strategy"] == "auto" and run.metrics["features_from_cache"] == 30
    assert run.metrics["features_computed"] == 6 + 2 * 30


def test_auto_lets_explicit_options_win(fashion_folder, tmp_path):
    run = graft.train(fashion_folder, out=tmp_path / "auto2", strategy="auto", epochs=2, augment_views=1, verbose=False, cache_dir=str(tmp_path / "c"))
    assert run.metrics["auto"]["options"]["augment_views"] == 1  # the user's, not the rule's 2
    assert run.metrics["features_computed"] == 6 + 30 and run.metrics["epochs_run"] <= 2
