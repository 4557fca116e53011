"""ONNX export: parity with PyTorch on real images, metadata enough to preprocess, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
skimage_data = pytest.importorskip("skimage.data")

from graft.input.images import load_image  # noqa: E402
from graft.shipping.bundle import load_bundle  # noqa: E402
from graft.shipping.export import ExportError, export_onnx  # noqa: E402


@pytest.fixture(scope="module")
def bundle(trained_run):
    return load_bundle(trained_run.bundle_dir)


@pytest.fixture(scope="module")
def real_images(holdout_folder):
    """Real Fashion-MNIST PNGs (grayscale 28 px) and a real colour photo (scikit-image's cat)."""
    paths = sorted(holdout_folder.rglob("*.png"))
    chelsea = Image.fromarray(skimage_data.chelsea())
    return [load_image(p) for p in paths] + [chelsea]


@pytest.fixture(scope="module")
def exported(bundle, real_images, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return export_onnx(bundle, out=out, opset=17, check_images=real_images)


def _session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_export_checks_parity_on_real_images(exported, real_images, capsys):
    with capsys.disabled():
        print(f"\nONNX parity: max |logit diff| {exported.max_abs_diff:.3e} on {exported.num_check_images} real images")
    assert exported.path.is_file() and exported.path.stat().st_size > 1_000_000
    assert exported.num_check_images == len(real_images) == 19
    assert exported.check_source == "given images"
    assert 0.0 <= exported.max_abs_diff < 1e-4 and exported.passed
    assert not list(exported.path.parent.glob(".*.tmp")), "the atomic write left a temporary file"


def test_onnx_matches_pytorch_independently_with_a_dynamic_batch(exported, bundle, real_images):
    session = _session(exported.path)
    batch_dim = session.get_inputs()[0].shape[0]
    assert isinstance(batch_dim, str), f"batch dimension is fixed: {batch_dim}"
    for images in (real_images[:1], real_images[3:8], real_images):  # 1, 5 and 19 images
        tensor = torch.stack([bundle.transform(image) for image in images]).numpy()
        got = session.run(["logits"], {"image": tensor})[0]
        # The ONNX graph is fp32: compare with PyTorch's fp32 path (predict may run bf16 within
        # graft.speed.numerics.BF16_TOLERANCE where the bundle was trained in bf16).
        precision, bundle.precision = bundle.precision, "fp32"
        try:
            expected = (bundle.logits(images) / bundle.temperature).numpy()  # the graph divides by it
        finally:
            bundle.precision = precision
        assert got.shape == (len(images), len(bundle.class_names))
        assert np.abs(got - expected).max() < 1e-4
        assert (got.argmax(1) == expected.argmax(1)).all()


def test_metadata_documents_classes_and_preprocessing(exported, bundle):
    model = onnx.load(str(exported.path))
    meta = {entry.key: entry.value for entry in model.metadata_props}
    pre = bundle.preprocessing
    assert json.loads(meta["graft.class_names"]) == bundle.class_names
    assert json.loads(meta["graft.preprocessing"]) == json.loads(json.dumps(pre.to_dict()))
    assert json.loads(meta["graft.mean"]) == list(pre.mean) and json.loads(meta["graft.std"]) == list(pre.std)
    assert json.loads(meta["graft.input_size"]) == list(pre.input_size)
    assert meta["graft.interpolation"] == pre.interpolation == "bicubic"
    assert float(meta["graft.crop_pct"]) == pre.crop_pct
    assert float(meta["graft.check_max_abs_diff"]) < 1e-4
    onnx.checker.check_model(model)


def test_metadata_alone_is_enough_to_preprocess(exported, bundle, holdout_folder):
    """A consumer without graft: resize, center crop and normalise from the metadata, with PIL."""
    session = _session(exported.path)
    meta = {entry.key: entry.value for entry in onnx.load(str(exported.path)).metadata_props}
    size = json.loads(meta["graft.input_size"])[-1]
    scale = int(np.floor(size / float(meta["graft.crop_pct"])))
    mean = np.array(json.loads(meta["graft.mean"]), dtype=np.float32).reshape(3, 1, 1)
    std = np.array(json.loads(meta["graft.std"]), dtype=np.float32).reshape(3, 1, 1)
    classes = json.loads(meta["graft.class_names"])

    photo = Image.fromarray(skimage_data.coffee())
    images = [load_image(p) for p in sorted(holdout_folder.rglob("*.png"))[:4]] + [photo]
    arrays = []
    for image in images:
        width, height = image.size
        short, long_ = (width, height) if width <= height else (height, width)
        new_long = int(scale * long_ / short)
        resized = image.resize((scale, new_long) if width <= height else (new_long, scale), Image.BICUBIC)
        left, top = int(round((resized.width - size) / 2)), int(round((resized.height - size) / 2))
        crop = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
        arrays.append((crop.transpose(2, 0, 1) - mean) / std)
    logits = session.run(["logits"], {"image": np.stack(arrays)})[0]
    precision, bundle.precision = bundle.precision, "fp32"  # the ONNX graph is fp32
    try:
        expected = (bundle.logits(images) / float(meta["graft.temperature"])).numpy()
    finally:
        bundle.precision = precision
    assert np.abs(logits - expected).max() < 1e-3
    assert [classes[i] for i in logits.argmax(1)] == [bundle.class_names[i] for i in expected.argmax(1)]


def test_default_check_uses_scikit_image_photos(bundle, tmp_path):
    result = export_onnx(bundle, out=tmp_path / "m.onnx")
    assert result.num_check_images == 3 and "chelsea" in result.check_source
    assert result.max_abs_diff < 1e-4 and result.path.is_file()


def test_a_failed_check_writes_nothing(bundle, tmp_path, real_images):
    out = tmp_path / "never.onnx"
    with pytest.raises(ExportError, match="nothing was written"):
        export_onnx(bundle, out=out, check_images=real_images[:2], tolerance=0.0)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_missing_extra_names_it(bundle, tmp_path, monkeypatch):
    from graft.extras import MissingExtraError

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` does when absent
    with pytest.raises(MissingExtraError, match=r'pip install "graft\[export\]"'):
        export_onnx(bundle, out=tmp_path / "m.onnx")


@pytest.mark.slow
def test_cli_export(trained_run, holdout_folder, tmp_path):
    out = tmp_path / "cli.onnx"
    command = [sys.executable, "-m", "graft.cli.main", "export", str(trained_run.bundle_dir)]
    result = subprocess.run(
        [*command, "--onnx", "--opset", "17", "--out", str(out), "--check-images", str(holdout_folder / "bag"), "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["path"] == str(out) and out.is_file()
    assert summary["check_images"] == 6 and summary["max_abs_diff"] < 1e-4

    refused = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "--onnx" in refused.stderr and "Traceback" not in refused.stderr


def test_a_multilabel_bundle_exports_sigmoid_scores_with_its_thresholds(multilabel_run, multilabel_csv, tmp_path, capsys):
    """The graph outputs the scores to compare with the thresholds; a consumer needs nothing but the
    file to get graft's label sets."""
    bundle = load_bundle(multilabel_run.bundle_dir)
    paths = sorted(multilabel_csv.parent.rglob("*.png"))[::3]  # 20 real images, two of each garment
    images = [load_image(p) for p in paths] + [Image.fromarray(skimage_data.chelsea())]
    result = export_onnx(bundle, out=tmp_path / "labels.onnx", check_images=images)
    with capsys.disabled():
        print(f"\nONNX parity, multi-label: max |score diff| {result.max_abs_diff:.3e} on {result.num_check_images} real images")
    assert result.compared == "scores" and 0.0 <= result.max_abs_diff < 1e-4

    model = onnx.load(str(result.path))
    meta = {entry.key: entry.value for entry in model.metadata_props}
    assert meta["graft.task"] == "multilabel" and json.loads(meta["graft.class_names"]) == bundle.class_names
    assert json.loads(meta["graft.thresholds"]) == bundle.thresholds and len(bundle.thresholds) == 3
    assert "graft.temperature" not in meta  # sigmoid scores are not temperature-scaled
    assert "sigmoid" in meta["graft.output"] and "graft.thresholds" in model.doc_string

    session = _session(result.path)
    assert [output.name for output in session.get_outputs()] == ["scores"]
    got = session.run(["scores"], {"image": torch.stack([bundle.transform(image) for image in images]).numpy()})[0]
    precision, bundle.precision = bundle.precision, "fp32"  # the ONNX graph is fp32
    try:
        expected = bundle.logits(images).sigmoid().numpy()
        predictions = bundle.predict(images, top_k=3)
    finally:
        bundle.precision = precision
    assert got.shape == (len(images), 3) and np.abs(got - expected).max() < 1e-4
    cuts = np.array(json.loads(meta["graft.thresholds"]))
    classes = json.loads(meta["graft.class_names"])
    sets = [{classes[i] for i in np.flatnonzero(row >= cuts)} for row in got]
    assert sets == [{label for label, _ in prediction.labels} for prediction in predictions]
    assert any(sets) and not all(sets)  # the trained model gives some images labels and some none


def test_a_single_label_export_says_its_task(exported):
    meta = {entry.key: entry.value for entry in onnx.load(str(exported.path)).metadata_props}
    assert meta["graft.task"] == "classification" and "graft.thresholds" not in meta
    assert exported.compared == "logits"
