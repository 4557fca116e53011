"""Calibrated scores: the temperature fitted on validation, carried by the bundle, measured in metrics.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import graft
from graft.errors import BundleError
from graft.input.images import load_image
from graft.shipping.bundle import load_bundle, save_bundle
from graft.training.calibration import CALIBRATION_BINS, calibration_measures, fit_temperature


@pytest.fixture(scope="module")
def lookalike_images(calibrated_run):
    """Every real image of the look-alike run's folder, with its class name."""
    paths = sorted(Path(calibrated_run.metrics["data"]["root"]).rglob("*.png"))
    return [load_image(path) for path in paths], [path.parent.name for path in paths]


def _nll(logits: torch.Tensor, labels: list[int], temperature: float) -> float:
    return float(torch.nn.functional.cross_entropy(logits / temperature, torch.tensor(labels)))


def test_fitted_temperature_minimises_the_nll_of_real_logits(calibrated_run, lookalike_images):
    bundle = load_bundle(calibrated_run.bundle_dir)
    images, names = lookalike_images
    logits = bundle.logits(images)
    labels = [bundle.class_names.index(name) for name in names]
    temperature = fit_temperature(logits, labels)
    best = _nll(logits, labels, temperature)
    assert best <= _nll(logits, labels, 1.0) + 1e-6
    for nearby in (temperature * 0.8, temperature * 1.25):  # a minimum, not merely an improvement
        assert best <= _nll(logits, labels, nearby) + 1e-6


def test_no_mistake_on_validation_leaves_the_temperature_at_1(trained_run):
    # Every validation image right: the NLL has no minimum, sharpening on it would be a guess.
    assert trained_run.metrics["accuracy"] == 1.0
    assert trained_run.metrics["calibration"]["temperature"] == load_bundle(trained_run.bundle_dir).temperature == 1.0


def test_the_temperature_changes_scores_but_never_the_argmax(calibrated_run, lookalike_images):
    bundle = load_bundle(calibrated_run.bundle_dir)
    images, _ = lookalike_images
    assert bundle.temperature == calibrated_run.metrics["calibration"]["temperature"] != 1.0
    logits = bundle.logits(images)
    calibrated = bundle.probabilities(images)
    raw = logits.softmax(dim=1)
    assert torch.equal(calibrated.argmax(1), raw.argmax(1))
    assert (calibrated - raw).abs().max() > 1e-3, "the temperature left every score as it was"
    torch.testing.assert_close(calibrated, (logits / bundle.temperature).softmax(dim=1))
    predictions = bundle.predict(images, top_k=len(bundle.class_names), unknown="off")  # the classes' own answers
    assert [p.label for p in predictions] == [bundle.class_names[i] for i in raw.argmax(1).tolist()]
    assert np.allclose([p.score for p in predictions], calibrated.max(1).values.numpy(), atol=1e-6)


def test_the_temperature_round_trips_through_save_and_load(calibrated_run, tmp_path):
    meta = json.loads((calibrated_run.bundle_dir / "graft.json").read_text())
    assert meta["temperature"] == calibrated_run.metrics["calibration"]["temperature"] != 1.0
    bundle = load_bundle(calibrated_run.bundle_dir)
    save_bundle(tmp_path / "hotter", bundle.model, {**bundle.meta, "temperature": 2.5})
    assert load_bundle(tmp_path / "hotter").temperature == 2.5

    older = tmp_path / "older"
    shutil.copytree(calibrated_run.bundle_dir, older)
    del meta["temperature"]
    (older / "graft.json").write_text(json.dumps(meta))
    assert load_bundle(older).temperature == 1.0  # a bundle from before calibration: scores as they were
    for bad in (0.0, -1.0, "2", 1e9):
        (older / "graft.json").write_text(json.dumps({**meta, "temperature": bad}))
        with pytest.raises(BundleError, match="temperature"):
            load_bundle(older)


def _ece(confidence: np.ndarray, correct: np.ndarray, bins: int) -> float:
    """Expected calibration error written out from its definition (equal-width bins), to check torchmetrics' against."""
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    return float(sum(abs(correct[index == i].mean() - confidence[index == i].mean()) * (index == i).mean()
                     for i in range(bins) if (index == i).any()))


def test_metrics_hold_sane_calibration_measures(calibrated_run):
    metrics = json.loads((calibrated_run.run_dir / "metrics.json").read_text())
    calibration = metrics["calibration"]
    assert calibration["bins"] == CALIBRATION_BINS == 15
    before, after = calibration["before"], calibration["after"]
    for part in (before, after):
        assert 0.0 <= part["ece"] <= 1.0 and part["nll"] >= 0.0 and 0.0 <= part["brier"] <= 2.0
        assert sum(part["reliability"]["count"]) == metrics["num_val"]
    assert after["nll"] < before["nll"]  # the temperature minimises the validation NLL
    assert {key: metrics[key] for key in ("ece", "nll", "brier")} == {key: after[key] for key in ("ece", "nll", "brier")}
    # val_predictions.json holds the calibrated scores: the ECE recomputed from them is metrics.json's.
    rows = json.loads((calibrated_run.run_dir / "val_predictions.json").read_text())
    confidence = np.array([row["score"] for row in rows])
    correct = np.array([row["label"] == row["true"] for row in rows], dtype=float)
    assert _ece(confidence, correct, 15) == pytest.approx(after["ece"], abs=1e-4)


def test_evaluate_and_serve_give_the_calibrated_scores(calibrated_run, lookalike_images):
    from fastapi.testclient import TestClient

    from graft.serve.app import create_app

    metrics = graft.evaluate(calibrated_run.bundle_dir, calibrated_run.metrics["data"]["root"])
    bundle = load_bundle(calibrated_run.bundle_dir)
    images, names = lookalike_images
    expected = calibration_measures(bundle.probabilities(images), [bundle.class_names.index(n) for n in names])
    assert metrics["temperature"] == bundle.temperature
    for key in ("ece", "nll", "brier"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-4)

    client = TestClient(create_app(bundle))
    assert client.get("/healthz").json()["temperature"] == bundle.temperature != 1.0
    path = sorted(Path(calibrated_run.metrics["data"]["root"]).rglob("*.png"))[0]
    served = client.post("/predict", files=[("files", (path.name, path.read_bytes(), "image/png"))]).json()["predictions"][0]
    assert served["score"] == pytest.approx(float(bundle.probabilities([load_image(path)]).max()), abs=1e-5)


def test_the_report_shows_a_reliability_diagram(calibrated_run):
    from _html import decode_png, parse_page

    section = parse_page(calibrated_run.run_dir / "report.html").sections["calibration"]
    assert len(section.images) == 1
    decode_png(section.images[0])
    calibration = calibrated_run.metrics["calibration"]
    assert f"{calibration['temperature']:.3g}" in section.text and "ECE" in section.text
    assert f"{calibration['before']['ece']:.3f}" in section.text and f"{calibration['after']['ece']:.3f}" in section.text


def test_the_onnx_export_gives_the_calibrated_probabilities(calibrated_run, lookalike_images, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx
    import onnxruntime

    from graft.shipping.export import export_onnx

    bundle = load_bundle(calibrated_run.bundle_dir)
    bundle.precision = "fp32"  # the ONNX graph is fp32
    images = lookalike_images[0][:12]
    result = export_onnx(bundle, out=tmp_path / "lookalikes.onnx", check_images=images)
    tensor = torch.stack([bundle.transform(image) for image in images]).numpy()
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(["logits"], {"image": tensor})[0]).softmax(dim=1)
    assert (got - bundle.probabilities(images)).abs().max() < 1e-4
    assert (got - bundle.logits(images).softmax(dim=1)).abs().max() > 1e-3  # the temperature is in the graph
    meta = {entry.key: entry.value for entry in onnx.load(str(result.path)).metadata_props}
    assert float(meta["graft.temperature"]) == bundle.temperature != 1.0
