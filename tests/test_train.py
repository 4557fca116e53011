"""End to end on real images: train, the run folder, the bundle, the cache, frozen weights."""

import json

import pytest
import torch

import graft
from graft.models.backbones import load_backbone
from graft.shipping.bundle import load_bundle

METRIC_KEYS = {
    "accuracy", "macro_f1", "per_class", "confusion_matrix", "class_names", "backbone", "strategy",
    "num_train", "num_val", "train_seconds", "trainable_params", "total_params",
}


def test_run_folder_holds_what_design_md_lists(trained_run):
    run = trained_run.run_dir
    for name in ("config.json", "history.jsonl", "metrics.json", "split.json", "val_predictions.json", "bundle/model.safetensors", "bundle/graft.json"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    assert metrics["class_names"] == ["bag", "sneaker", "trouser"]
    assert sum(map(sum, metrics["confusion_matrix"])) == metrics["num_val"] == 6
    assert metrics["accuracy"] >= 0.7  # three far-apart classes from 30 real images
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert len(history) == metrics["epochs_run"]
    assert {"epoch", "lr", "train_loss", "val_loss", "val_accuracy", "seconds"} <= set(history[0])
    config = graft.TrainConfig.from_dict({k: v for k, v in json.loads((run / "config.json").read_text()).items() if k != "resolved"})
    assert config.strategy == "feature-extract" and config.epochs == 30
    rows = json.loads((run / "val_predictions.json").read_text())
    assert len(rows) == 6 and sum(r["true"] == r["label"] for r in rows) / 6 == metrics["accuracy"]
    meta = json.loads((run / "bundle" / "graft.json").read_text())
    assert meta["preprocessing"]["mean"] == [0.5, 0.5, 0.5] and meta["format_version"] == 1


def test_bundle_round_trip_gives_identical_predictions(trained_run, holdout_folder):
    images = sorted(holdout_folder.rglob("*.png"))
    first = load_bundle(trained_run.bundle_dir).predict(images, top_k=3)
    second = load_bundle(trained_run.bundle_dir).predict(images, top_k=3)
    assert [p.to_dict() for p in first] == [p.to_dict() for p in second]
    assert len(first) == len(images) and len(first[0].top_k) == 3


def test_frozen_backbone_weights_and_batchnorm_buffers_are_bitwise_unchanged(trained_run):
    original = load_backbone("efficientnet_lite0").model.state_dict()
    trained = load_bundle(trained_run.bundle_dir).model.backbone.state_dict()
    assert set(original) == set(trained)
    buffers = [k for k in original if "running_" in k]
    assert buffers, "the backbone has BatchNorm buffers to check"
    for key, tensor in original.items():
        assert torch.equal(tensor, trained[key]), key


def test_second_run_reads_features_from_the_cache_without_a_backbone_forward(fashion_folder, tmp_path, monkeypatch):
    import graft.training.features

    first = graft.train(fashion_folder, strategy="feature-extract", out=tmp_path / "a", epochs=3, verbose=False, cache_dir=str(tmp_path / "cache"))
    assert first.metrics["features_computed"] == 36

    def no_forward(*args, **kwargs):
        raise AssertionError("the backbone ran although every feature was cached")

    monkeypatch.setattr(graft.training.features, "forward_batches", no_forward)
    second = graft.train(fashion_folder, strategy="feature-extract", out=tmp_path / "b", epochs=3, verbose=False, cache_dir=str(tmp_path / "cache"))
    assert second.metrics["features_computed"] == 0 and second.metrics["features_from_cache"] == 36
    assert second.metrics["accuracy"] == first.metrics["accuracy"]


def test_training_is_deterministic_on_cpu(fashion_folder, tmp_path):
    runs = [graft.train(fashion_folder, strategy="feature-extract", out=tmp_path / str(i), epochs=5, verbose=False) for i in range(2)]
    assert [r.to_dict() for r in runs[0].history] == [
        {**r.to_dict(), "seconds": runs[0].history[i].seconds} for i, r in enumerate(runs[1].history)
    ]


def test_augmented_views_are_cached_too(fashion_folder, tmp_path):
    run = graft.train(fashion_folder, strategy="feature-extract", out=tmp_path / "aug", epochs=3, augment_views=2, verbose=False, cache_dir=str(tmp_path / "c"))
    assert run.metrics["features_computed"] == 36 + 2 * 30
    again = graft.train(fashion_folder, strategy="feature-extract", out=tmp_path / "aug2", epochs=3, augment_views=2, verbose=False, cache_dir=str(tmp_path / "c"))
    assert again.metrics["features_computed"] == 0


def test_mlp_head(fashion_folder, tmp_path, holdout_folder):
    run = graft.train(fashion_folder, strategy="feature-extract", out=tmp_path / "mlp", head="mlp", hidden=64, dropout=0.2, epochs=10, verbose=False)
    bundle = load_bundle(run.bundle_dir)
    assert bundle.meta["head"]["kind"] == "mlp" and bundle.meta["head"]["hidden"] == 64
    assert graft.evaluate(bundle, holdout_folder)["num_images"] == 18


def test_evaluate_on_a_holdout_folder(trained_run, holdout_folder):
    metrics = graft.evaluate(trained_run.bundle_dir, holdout_folder)
    assert {"accuracy", "macro_f1", "per_class", "confusion_matrix", "class_names"} <= set(metrics)
    assert metrics["num_images"] == 18 and metrics["accuracy"] >= 0.6


def test_bad_options_are_refused_before_any_work(fashion_folder, tmp_path):
    with pytest.raises(graft.ConfigError, match="feature-extract"):
        graft.train(fashion_folder, out=tmp_path / "x", strategy="magic", verbose=False)
    with pytest.raises(graft.ConfigError, match="^head: "):
        graft.train(fashion_folder, strategy="feature-extract", out=tmp_path / "x", head="conv", verbose=False)
    assert not (tmp_path / "x").exists()
