"""Property-based tests (hypothesis): image loading, the server's upload path, option values and
bundle documents never crash.

Random bytes, damaged real encodings and random valid images of every mode and format: the
result is an upright RGB image, or an `ImageError` naming the file (a 422 from the server),
never any other exception and never a 500.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from graft.config import TrainConfig
from graft.errors import ConfigError, ImageError
from graft.input.images import load_image

FUZZ = settings(max_examples=int(os.environ.get("GRAFT_FUZZ_EXAMPLES", "60")), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SERVER_FUZZ = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
MODES = ("L", "RGB", "RGBA", "P", "LA", "I;16", "CMYK", "1")


@st.composite
def images(draw) -> tuple[Image.Image, str]:
    """A random valid picture: any mode, 1 to 48 pixels a side, saved in a format that takes it."""
    width = draw(st.integers(1, 48))
    height = draw(st.integers(1, 48))
    mode = draw(st.sampled_from(MODES))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 4), dtype=np.uint8)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, size=(height, width), dtype=np.uint16))
        fmt = draw(st.sampled_from(("PNG", "TIFF")))
    else:
        image = Image.fromarray(pixels, "RGBA").convert(mode)
        allowed = {
            "L": FORMATS, "RGB": FORMATS, "RGBA": ("PNG", "TIFF", "WEBP", "GIF"), "P": ("PNG", "GIF", "BMP", "TIFF"),
            "LA": ("PNG", "TIFF"), "CMYK": ("JPEG", "TIFF"), "1": ("PNG", "BMP", "TIFF", "GIF", "PPM"),
        }[mode]
        fmt = draw(st.sampled_from(allowed))
    return image, fmt


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _rgb_or_named_error(data: bytes, name: str = "fuzz.bin") -> Image.Image | None:
    try:
        image = load_image(data, name=name)
    except ImageError as error:
        assert error.path == name and error.reason
        return None
    assert image.mode == "RGB" and image.width >= 1 and image.height >= 1
    np.asarray(image)  # the pixels are really there
    return image


# Magic numbers of the formats Pillow reads, so random tails reach the decoders' parsers.
MAGIC = (b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"P6\n")


@FUZZ
@given(st.sampled_from(MAGIC), st.binary(max_size=4096))
def test_random_bytes_load_or_give_a_named_error(magic, data):
    _rgb_or_named_error(magic + data)


@FUZZ
@given(images(), st.data())
def test_damaged_real_encodings_load_or_give_a_named_error(picture, data):
    image, fmt = picture
    encoded = bytearray(_encode(image, fmt))
    action = data.draw(st.sampled_from(("truncate", "flip", "splice")))
    if action == "truncate":
        encoded = encoded[: data.draw(st.integers(0, max(0, len(encoded) - 1)))]
    elif action == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            position = data.draw(st.integers(0, len(encoded) - 1))
            encoded[position] ^= data.draw(st.integers(1, 255))
    else:
        position = data.draw(st.integers(0, len(encoded)))
        encoded[position:position] = data.draw(st.binary(min_size=1, max_size=64))
    _rgb_or_named_error(bytes(encoded), name=f"damaged.{fmt.lower()}")


@FUZZ
@given(images())
def test_every_valid_image_becomes_rgb_of_the_same_size(picture):
    image, fmt = picture
    loaded = load_image(_encode(image, fmt), name=f"valid.{fmt.lower()}")
    assert loaded.mode == "RGB" and loaded.size == image.size


@pytest.fixture(scope="module")
def client(trained_run):
    from fastapi.testclient import TestClient

    from graft.serve.app import create_app

    with TestClient(create_app(trained_run.bundle_dir, max_upload_bytes=64 * 1024)) as test_client:
        yield test_client


@SERVER_FUZZ
@given(st.binary(max_size=2048), st.text(min_size=1, max_size=40).filter(lambda s: "\x00" not in s))
def test_server_answers_random_uploads_with_a_prediction_or_a_clear_4xx(client, data, name):
    response = client.post("/predict", files=[("files", (name, data, "application/octet-stream"))])
    assert response.status_code in (200, 413, 422), response.text
    body = response.json()
    if response.status_code == 200:
        assert len(body["predictions"]) == 1
    else:
        assert body["detail"]


@SERVER_FUZZ
@given(images())
def test_server_predicts_every_random_valid_image(client, picture):
    image, fmt = picture
    response = client.post("/predict?top_k=2", files=[("files", (f"x.{fmt.lower()}", _encode(image, fmt), "image/*"))])
    assert response.status_code == 200, response.text
    (row,) = response.json()["predictions"]
    assert row["label"] in ("bag", "sneaker", "trouser", "unknown") and len(row["top_k"]) == 2  # random pixels may be unknown
    assert 0.0 <= row["score"] <= 1.0


# --- option values: any number, or anything else, gives a valid config or a ConfigError naming its option


# Every field typed int or float, read from the dataclass: a numeric field added later is fuzzed too.
NUMERIC_FIELDS = sorted(f.name for f in dataclasses.fields(TrainConfig) if f.type.split(" |")[0] in ("int", "float"))
OPTION_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(2**80), 2**80),
    st.floats(),  # nan, inf, -0.0, subnormals and huge ones included
    st.sampled_from([0, 1, -1, 2**32 - 1, 2**32, 1e-300, 1e300, 0.2, 0.1999999, 1.0, 1.0000001, 10.0, 10.000001]),
    st.text(max_size=4),
)


def _valid_or_named(options: dict) -> None:
    try:
        config = TrainConfig(data=".", out=".", **options)
    except ConfigError as error:
        named = [name for name in options if str(error).startswith(name + ": expected ") and error.parameter == name]
        assert named, f"{error} names none of {sorted(options)}"
        return
    saved = json.loads(json.dumps(config.to_dict(), allow_nan=False))  # JSON holds it as it is
    for name in options:
        value = getattr(config, name)
        assert value is None or (type(value) in (int, float) and math.isfinite(value)), (name, value)
    assert TrainConfig.from_dict(saved) == config


@FUZZ
@given(st.sampled_from(NUMERIC_FIELDS), OPTION_VALUES)
def test_any_value_of_one_numeric_option_gives_a_config_or_a_named_config_error(name, value):
    assert {"lr", "weight_decay", "seed", "batch_size", "crop_pct", "lora_rank", "warmup_epochs"} <= set(NUMERIC_FIELDS)
    _valid_or_named({name: value})


@FUZZ
@given(st.dictionaries(st.sampled_from(NUMERIC_FIELDS), OPTION_VALUES, max_size=6))
def test_any_values_of_several_numeric_options_give_a_config_or_a_named_config_error(options):
    _valid_or_named(options)


@FUZZ
@given(st.sampled_from(["BATCH_SIZE", "SEED", "TOP_K", "PORT", "UPLOAD_MB", "UPLOAD_BYTES", "IMAGES_PER_REQUEST", "CLASS_COUNT"]), OPTION_VALUES)
def test_the_command_options_check_gives_a_plain_number_or_a_named_config_error(range_name, value):
    from graft import ranges

    try:
        number = ranges.check_number("option", value, getattr(ranges, range_name))
    except ConfigError as error:
        assert str(error).startswith("option: expected ") and error.parameter == "option"
        return
    assert type(number) in (int, float) and math.isfinite(number) and not isinstance(value, (bool, str))


# --- bundle documents -----------------------------------------------------------------------------
# Random mutations of a real bundle's graft.json (fields removed, types swapped, numbers out of
# range, nested junk): the bundle loads and predicts real images as it did, or `load_bundle` raises
# one `BundleError` naming a mutated field; never another exception, never a failure at predict time.


BUNDLE_FUZZ = settings(
    max_examples=int(os.environ.get("GRAFT_FUZZ_BUNDLE_EXAMPLES", "30")), deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
EXTREME_NUMBERS = (0, -1, 1, 2, 3, 16, 2048, 10**6, 2**63, -(2**63), 1e-9, 0.5, 1.5, 1e308, -1e308, math.inf, -math.inf, math.nan)


def _bundle_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON document: each key of each object, each item of each list."""
    paths = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        paths.append((*prefix, key))
        paths.extend(_bundle_paths(item, (*prefix, key)))
    return paths


@st.composite
def mutated_documents(draw, document: dict) -> tuple[dict, list[tuple]]:
    """`document` with 1 to 3 random mutations, and the paths mutated."""
    document = copy.deepcopy(document)
    touched = []
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_bundle_paths(document)))
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        old = parent[path[-1]]
        action = draw(st.sampled_from(("remove", "junk", "swap type", "number", "nest junk")))
        if action == "remove":
            del parent[path[-1]]
        elif action == "junk":
            parent[path[-1]] = draw(JUNK)
        elif action == "swap type":
            parent[path[-1]] = draw(st.sampled_from((str(old), [old], {"value": old}, None, True, 1.0, "")))
        elif action == "number":
            number = draw(st.sampled_from(EXTREME_NUMBERS))
            parent[path[-1]] = number * old if isinstance(old, (int, float)) and not isinstance(old, bool) and draw(st.booleans()) else number
        elif isinstance(old, dict):
            old[draw(st.text(max_size=8))] = draw(JUNK)
        else:
            parent[path[-1]] = {"nested": old, "junk": draw(JUNK)}
        touched.append(path)
    return document, touched


@pytest.fixture(scope="module")
def bundle_fuzz_base(trained_run, holdout_folder):
    """The real bundle's graft.json, a few real images and the logits the bundle gives them."""
    from graft.shipping.bundle import META_FILE, load_bundle
    from graft.input.images import load_image

    document = json.loads((trained_run.bundle_dir / META_FILE).read_text())
    images = [load_image(path) for path in sorted(holdout_folder.rglob("*.png"))[::6][:3]]
    return document, images, load_bundle(trained_run.bundle_dir).logits(images)


@BUNDLE_FUZZ
@given(st.data())
def test_a_mutated_bundle_document_loads_and_predicts_or_names_a_field(trained_run, bundle_fuzz_base, data):
    import torch

    from graft.shipping.bundle import META_FILE, MODEL_FILE, load_bundle
    from graft.shipping.unknown import UNKNOWN_FILE
    from graft.errors import BundleError

    document, images, expected_logits = bundle_fuzz_base
    mutated, touched = data.draw(mutated_documents(document))
    fields = {str(path[0]) for path in touched}
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / MODEL_FILE).symlink_to(trained_run.bundle_dir / MODEL_FILE)
        (Path(folder) / UNKNOWN_FILE).symlink_to(trained_run.bundle_dir / UNKNOWN_FILE)
        (Path(folder) / META_FILE).write_text(json.dumps(mutated))
        try:
            bundle = load_bundle(folder)
        except BundleError as error:
            message = str(error)
            assert "\n" not in message and any(field in message for field in fields), (message, touched)
            return
        predictions = bundle.predict(images, top_k=2)
        logits = bundle.logits(images)
    assert len(predictions) == len(images) and logits.shape == expected_logits.shape
    assert bool(torch.isfinite(logits).all())
    for prediction in predictions:
        assert prediction.label in (*bundle.class_names, "unknown") and 0.0 <= prediction.score <= 1.0
    if not fields & {"preprocessing", "precision"}:  # nothing that changes what the model computes
        assert torch.allclose(logits, expected_logits, atol=1e-5), touched
