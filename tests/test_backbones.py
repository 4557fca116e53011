import time

import pytest
import torch

from graft.errors import BackboneError, ConfigError
from graft.input.images import load_image
from graft.input.preprocessing import build_transforms
from graft.models.backbones import bundled_names, load_backbone


def _imagenet_accuracy(backbone, preprocessing, images):
    transform = build_transforms(preprocessing)
    batch = torch.stack([transform(load_image(path)) for path, _ in images])
    labels = torch.tensor([label for _, label in images])
    with torch.no_grad():
        logits = backbone.imagenet_classifier(backbone.model(batch))
    return float((logits.argmax(1) == labels).float().mean())


def test_bundled_lite0_with_its_preprocessing_recognises_imagenet(foolbox_imagenet):
    backbone = load_backbone("efficientnet_lite0", keep_classifier=True)
    assert backbone.preprocessing.mean == (0.5, 0.5, 0.5)
    assert backbone.preprocessing.interpolation == "bicubic"
    right = _imagenet_accuracy(backbone, backbone.preprocessing, foolbox_imagenet)
    assert right >= 0.80
    # The same weights fed ImageNet's usual mean/std (what a generic recipe would use) do worse.
    wrong = backbone.preprocessing.__class__(
        **{**backbone.preprocessing.to_dict(), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    )
    assert _imagenet_accuracy(backbone, wrong, foolbox_imagenet) <= right - 0.10


def test_weights_file_gives_the_same_model(lite0, tmp_path, foolbox_imagenet):
    from safetensors.torch import save_file

    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in lite0.model.state_dict().items()}, str(path))
    again = load_backbone("tf_efficientnet_lite0", weights=path)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(again.model(x), lite0.model(x))
    assert again.weights_source.startswith("file ")


def test_weights_file_that_does_not_fit_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"fc.weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(BackboneError, match="do not fit"):
        load_backbone("efficientnet_lite0", weights=path)
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone("efficientnet_lite0", weights=tmp_path / "missing.pth")


def test_offline_hub_backbone_fails_fast_with_the_bundled_choices(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(BackboneError) as error:
        load_backbone("resnet18")
    assert time.perf_counter() - started < 30
    message = str(error.value)
    for name in bundled_names():
        assert name in message
    assert "--weights" in message


def test_unknown_backbone_suggests_names():
    with pytest.raises(ConfigError, match="efficientnet_lite0"):
        load_backbone("efficientnet_lite00")
