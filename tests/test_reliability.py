"""Hostile inputs, through every command: a named, actionable error or a listed skip, never a traceback.

The corpus is generated here from real images (Fashion-MNIST from the fixtures, scikit-image's
photo); tests/test_images.py checks each decoder case on its own, tests/test_data.py the basic
folder cases (hidden files, a single class, loose images). See docs/reliability.md for the table.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import graft
from graft.errors import BackboneError, BundleError, ConfigError, DataError
from graft.input.data import load_dataset
from graft.input.images import MAX_IMAGE_PIXELS
from graft.shipping.bundle import BUNDLE_FORMAT, META_FILE, MODEL_FILE, load_bundle

# File name -> the words its refusal must contain.
BAD = {
    "empty.jpg": "empty",
    "truncated.jpg": "truncated",
    "corrupt.png": "damaged",
    "notes.jpg": "not an image",
    "bomb.png": "decompression bomb",
}
# Files that must load (converted to upright RGB) and be predicted.
GOOD = ("cmyk.jpg", "gray16.png", "palette-alpha.png", "exif-rotated.jpg", "one-pixel.png", "façade photo ü.png")


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _upright(fashion_folder: Path) -> Image.Image:
    """A real trouser photo, upscaled so that a 90° turn changes what the network sees."""
    source = sorted((fashion_folder / "trouser").glob("*.png"))[0]
    return Image.open(source).convert("RGB").resize((112, 112), Image.Resampling.BICUBIC)


def _exif_rotated(upright: Image.Image) -> bytes:
    """The upright picture stored sideways, with the EXIF tag that says how to turn it back."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    return _encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=100, exif=exif.tobytes())


def write_corpus(folder: Path, fashion_folder: Path) -> dict[str, Path]:
    """Write every hostile and odd-but-valid file into `folder`; returns name -> path."""
    from skimage import data as skimage_data

    folder.mkdir(parents=True, exist_ok=True)
    photo = Image.fromarray(skimage_data.chelsea())
    base = _upright(fashion_folder)
    png = bytearray(_encode(photo, "PNG"))
    start = png.find(b"IDAT") + 16
    png[start : start + 64] = bytes(b ^ 0xFF for b in png[start : start + 64])  # damaged pixel data
    side = int(MAX_IMAGE_PIXELS**0.5) + 100
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    palette.paste(1, (4, 4, 12, 12))
    contents = {
        "empty.jpg": b"",
        "truncated.jpg": _encode(photo, "JPEG")[:3000],
        "corrupt.png": bytes(png),
        "notes.jpg": b"shopping list: milk, eggs\n",
        "bomb.png": _encode(Image.new("1", (side, side)), "PNG", optimize=True),
        "cmyk.jpg": _encode(base.convert("CMYK"), "JPEG", quality=95),
        "gray16.png": _encode(Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257), "PNG"),
        "palette-alpha.png": _encode(palette, "PNG", transparency=0),
        "exif-rotated.jpg": _exif_rotated(base),
        "one-pixel.png": _encode(Image.new("RGB", (1, 1), (90, 60, 30)), "PNG"),
        "façade photo ü.png": _encode(base, "PNG"),
    }
    paths = {}
    for name, content in contents.items():
        paths[name] = folder / name
        paths[name].write_bytes(content)
    # What a copy from a Mac or a sync tool leaves behind: never listed, never read.
    (folder / ".DS_Store").write_bytes(b"\x00\x01junk")
    (folder / "._cmyk.jpg").write_bytes(b"AppleDouble junk")
    (folder / "__MACOSX").mkdir(exist_ok=True)
    (folder / "__MACOSX" / "._x.png").write_bytes(b"junk")
    (folder / "loop").symlink_to(folder, target_is_directory=True)  # a symlink loop
    return paths


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, fashion_folder) -> Path:
    folder = tmp_path_factory.mktemp("corpus") / "odd files"
    write_corpus(folder, fashion_folder)
    return folder


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory, fashion_folder, corpus) -> Path:
    """The real fixture folder with the corpus spread over its classes, plus odd class folders."""
    root = tmp_path_factory.mktemp("messy") / "data"
    shutil.copytree(fashion_folder, root)
    for index, name in enumerate([*BAD, *GOOD]):
        shutil.copy(corpus / name, root / ("bag", "sneaker", "trouser")[index % 3] / name)
    (root / "empty class").mkdir()  # an empty class folder
    (root / "__MACOSX" / "bag").mkdir(parents=True)
    (root / "__MACOSX" / "bag" / "._1.png").write_bytes(b"junk")
    (root / "bag" / "loop").symlink_to(root / "bag", target_is_directory=True)
    return root


def _cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graft.cli.main", *map(str, args)], capture_output=True, text=True, timeout=300)


# --- training data ----------------------------------------------------------------------------


def test_training_data_lists_every_bad_file_with_its_reason_or_skips_it(messy_folder):
    with pytest.raises(DataError) as error:
        load_dataset(messy_folder)
    message = str(error.value)
    for name, words in BAD.items():
        assert f"{name}: " in message and words in message, (name, message)
    assert "--on-bad-image skip" in message and f"{len(BAD)} of " in message

    dataset = load_dataset(messy_folder, on_bad_image="skip")
    assert sorted(Path(b.path).name for b in dataset.bad_images) == sorted(BAD)
    used = {p.name for p in dataset.train.paths + dataset.val.paths}
    assert set(GOOD) <= used, "odd but valid files are converted and used"
    assert len(used) == 36 + len(GOOD), "the symlink loop adds no file twice, junk adds none"
    assert dataset.class_names == ["bag", "sneaker", "trouser"]
    assert any("empty class" in w and "skipped" in w for w in dataset.warnings)


def test_train_cli_on_a_messy_folder_is_one_clear_error(messy_folder, tmp_path):
    result = _cli("train", messy_folder, "--out", tmp_path / "run", "--epochs", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert all(name in result.stderr for name in BAD) and "--on-bad-image skip" in result.stderr


def test_a_class_with_one_image_is_warned_and_trained_on(fashion_folder, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(fashion_folder, root)
    for path in sorted((root / "bag").glob("*.png"))[1:]:
        path.unlink()
    dataset = load_dataset(root)
    assert dataset.train.counts()["bag"] == 1 and dataset.val.counts()["bag"] == 0
    assert any("single image" in w and "training only" in w for w in dataset.warnings)


def test_a_1_to_100_imbalance_is_warned_and_balanced_weighting_is_there(tmp_path):
    from graft.input.sample_data import load_fashion_mnist, write_image_folder
    from graft.strategies.feature_extract import class_weights

    source = load_fashion_mnist("test")
    many = np.flatnonzero(source.labels == 1)[:200]
    few = np.flatnonzero(source.labels == 8)[:2]
    root = tmp_path / "imbalanced"
    write_image_folder(source, np.concatenate([many, few]), root)
    dataset = load_dataset(root)
    warning = next(w for w in dataset.warnings if "imbalanced" in w)
    assert "160:1" in warning and "--class-weighting balanced" in warning
    weights = class_weights(torch_labels(dataset.train.labels), 2, "balanced")
    assert float(weights.max() / weights.min()) == pytest.approx(160.0)
    assert dataset.summary()["imbalance_ratio"] == 160.0


def torch_labels(labels: list[int]):
    import torch

    return torch.tensor(labels)


# --- predict, evaluate, serve ------------------------------------------------------------------


def test_predict_cli_lists_bad_files_predicts_the_rest_and_ignores_junk(trained_run, corpus):
    result = _cli("predict", trained_run.bundle_dir, corpus, "--format", "json")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    rows = {Path(row["path"]).name: row for row in map(json.loads, result.stdout.splitlines())}
    assert set(rows) == set(BAD) | set(GOOD), "junk, __MACOSX and the symlink loop are not listed"
    for name, words in BAD.items():
        assert words in rows[name]["error"] and name in result.stderr
    for name in GOOD:
        assert rows[name]["label"] in ("bag", "sneaker", "trouser", "unknown")  # odd images may be unlike the training ones


def test_exif_rotated_photo_is_predicted_like_the_upright_one(trained_run, fashion_folder):
    bundle = load_bundle(trained_run.bundle_dir)
    upright = _upright(fashion_folder)
    turned = _exif_rotated(upright)
    as_stored = Image.open(io.BytesIO(turned))  # the sideways pixels, EXIF ignored
    straight, rotated, sideways = (
        bundle.logits([image]).softmax(1)[0]
        for image in (upright, graft_load(turned), as_stored.convert("RGB"))
    )
    assert float((rotated - straight).abs().max()) < 0.05
    assert rotated.argmax() == straight.argmax()
    assert float((sideways - straight).abs().max()) > float((rotated - straight).abs().max())


def graft_load(data: bytes) -> Image.Image:
    from graft.input.images import load_image

    return load_image(data, name="exif-rotated.jpg")


def test_evaluate_lists_or_refuses_bad_files_by_name(trained_run, messy_folder):
    metrics = graft.evaluate(trained_run.bundle_dir, messy_folder, on_bad_image="skip")
    assert sorted(Path(b["path"]).name for b in metrics["bad_images"]) == sorted(BAD)
    assert metrics["num_images"] == 36 + len(GOOD)
    result = _cli("evaluate", trained_run.bundle_dir, messy_folder, "--json")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert all(name in result.stderr for name in BAD) and "--on-bad-image skip" in result.stderr


@pytest.fixture(scope="module")
def client(trained_run):
    from fastapi.testclient import TestClient

    from graft.serve.app import create_app

    with TestClient(create_app(trained_run.bundle_dir, max_upload_bytes=2_000_000)) as test_client:
        yield test_client


def test_serve_refuses_each_bad_upload_by_name_and_predicts_the_odd_valid_ones(client, corpus):
    for name, words in BAD.items():
        response = client.post("/predict", files=[("files", (name, (corpus / name).read_bytes(), "image/jpeg"))])
        too_large = name == "bomb.png"  # 413: refused for its size, from its header
        assert response.status_code == (413 if too_large else 422), (name, response.text)
        body = response.json()
        assert body["file"] == name and words in body["detail"]
    files = [("files", (name, (corpus / name).read_bytes(), "application/octet-stream")) for name in GOOD]
    response = client.post("/predict", files=files)
    assert response.status_code == 200, response.text
    assert [row["file"] for row in response.json()["predictions"]] == list(GOOD)


# --- bad options: refused before any work, with the valid choices ---------------------------------


def test_unknown_backbone_and_strategy_are_refused_before_reading_any_image(tmp_path):
    out = tmp_path / "run"
    # The data folder does not even exist: the option error must come first.
    result = _cli("train", tmp_path / "nowhere", "--out", out, "--backbone", "resnet5O")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "resnet50" in result.stderr and "efficientnet_lite0" in result.stderr and "nowhere" not in result.stderr
    result = _cli("train", tmp_path / "nowhere", "--out", out, "--strategy", "finetune")
    assert result.returncode == 2 and "feature-extract" in result.stderr and "gradual" in result.stderr
    assert not out.exists()


def test_incompatible_options_are_refused_before_any_work(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"--train-stages: expected 1 to 8 \(the backbone has 8 stages\), got 9"):
        graft.train(tmp_path / "nowhere", out=out, strategy="partial", train_stages=9, verbose=False)
    with pytest.raises(BackboneError, match="--weights"):
        graft.train(tmp_path / "nowhere", strategy="feature-extract", out=out, weights=str(tmp_path / "missing.safetensors"), verbose=False)
    assert not out.exists()


def test_predict_and_serve_options_are_checked(trained_run, tmp_path):
    from graft.serve.app import create_app

    result = _cli("predict", trained_run.bundle_dir, tmp_path, "--top-k", "0")
    assert result.returncode == 2 and "--top-k" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(ConfigError, match="^max_images: expected"):
        create_app(trained_run.bundle_dir, max_images=0)


# --- safe loading -------------------------------------------------------------------------------


def _copy_bundle(trained_run, tmp_path) -> Path:
    return Path(shutil.copytree(trained_run.bundle_dir, tmp_path / "bundle"))


def test_a_bundle_loads_without_unpickling_anything(trained_run, tmp_path, monkeypatch, holdout_folder):
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("a bundle load tried to unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    bundle = load_bundle(trained_run.bundle_dir)
    assert bundle.predict(sorted(holdout_folder.rglob("*.png"))[:1])[0].label in bundle.class_names


def test_bundle_of_a_newer_format_or_with_missing_files_is_refused(trained_run, tmp_path):
    bundle = _copy_bundle(trained_run, tmp_path)
    meta = json.loads((bundle / META_FILE).read_text())
    (bundle / META_FILE).write_text(json.dumps({**meta, "format_version": BUNDLE_FORMAT + 1}))
    with pytest.raises(BundleError, match=f"format {BUNDLE_FORMAT + 1} is newer.*upgrade graft"):
        load_bundle(bundle)
    (bundle / META_FILE).write_text(json.dumps(meta))
    (bundle / MODEL_FILE).write_bytes(pickle.dumps({"weights": [1, 2, 3]}))  # a pickle in disguise
    with pytest.raises(BundleError, match="cannot be read as safetensors"):
        load_bundle(bundle)
    (bundle / MODEL_FILE).unlink()
    with pytest.raises(BundleError, match=f"incomplete \\({MODEL_FILE} is missing\\)"):
        load_bundle(bundle)
    (bundle / META_FILE).unlink()
    result = _cli("predict", bundle, tmp_path)
    assert result.returncode == 2 and "incomplete" in result.stderr and "Traceback" not in result.stderr


class _Payload:
    """Runs code when unpickled: what a hostile "weights" file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_hostile_torch_weights_file_is_refused_without_running_it(tmp_path):
    import torch

    from graft.models.backbones import load_backbone

    marker = tmp_path / "pwned"
    path = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(1), "payload": _Payload(marker)}, path)
    with pytest.raises(BackboneError, match="could not be read as a state dict"):
        load_backbone("efficientnet_lite0", weights=path)
    assert not marker.exists()


def test_every_torch_load_in_graft_is_weights_only():
    import ast

    import graft as package

    calls = []
    for path in Path(package.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
                owner = node.func.value
                if isinstance(owner, ast.Name) and owner.id == "torch":
                    calls.append((path.name, node.lineno, node))
    assert calls, "expected at least the --weights reader"
    for name, line, node in calls:
        flags = {k.arg: k.value for k in node.keywords}
        assert isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True, f"{name}:{line}"
    assert not [p for p in Path(package.__file__).parent.rglob("*.py") if "import pickle" in p.read_text(encoding="utf-8")]
