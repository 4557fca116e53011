"""Class activation maps (grad-cam) for a real bundle's predictions, from Python and `predict --explain`."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from graft.errors import ConfigError
from graft.report.explain import explain_images, target_layer
from graft.shipping.bundle import load_bundle


@pytest.fixture(scope="module")
def images(holdout_folder):
    return sorted(holdout_folder.rglob("*.png"))[::6][:3]


def test_explain_writes_one_overlay_per_image_for_the_predicted_class(trained_run, images, tmp_path):
    bundle = load_bundle(trained_run.bundle_dir)
    explanations = explain_images(bundle, images, tmp_path / "cams")
    predictions = bundle.predict(images)
    assert [e.label for e in explanations] == [p.label for p in predictions]
    assert [e.score for e in explanations] == pytest.approx([p.score for p in predictions], abs=1e-5)
    size = bundle.preprocessing.image_size
    for explanation, image in zip(explanations, images):
        assert explanation.out == tmp_path / "cams" / f"{image.stem}.cam.png"
        overlay = np.asarray(Image.open(explanation.out).convert("RGB"), dtype=float)
        assert overlay.shape == (size + 18, size, 3)
        # The heat map is not flat: the jet colours vary over the image.
        assert overlay[18:].std(axis=(0, 1)).max() > 10


def test_explain_takes_the_map_at_the_last_stage(trained_run):
    from graft.models.stages import discover_stages

    model = load_bundle(trained_run.bundle_dir).model
    name, _ = target_layer(model)
    assert name == discover_stages(model.backbone)[-1].module_names[-1]


def test_explain_a_chosen_class_and_refuse_unknown_ones(trained_run, images, tmp_path):
    bundle = load_bundle(trained_run.bundle_dir)
    [chosen] = explain_images(bundle, images[:1], tmp_path, labels=["trouser"])
    assert chosen.label == "trouser"
    with pytest.raises(ConfigError, match="not among the bundle's classes"):
        explain_images(bundle, images[:1], tmp_path, labels=["cat"])
    with pytest.raises(ConfigError, match="--explain"):
        explain_images(bundle, images[:1], chosen.out)  # a file, not a folder


def test_predict_explain_writes_maps(trained_run, images, tmp_path, capsys):
    from graft.cli.main import main

    folder = tmp_path / "maps"
    assert main(["predict", str(trained_run.bundle_dir), *map(str, images[:2]), "--format", "json", "--explain", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{p.stem}.cam.png" for p in images[:2])
    assert "2 class activation maps" in capsys.readouterr().err
