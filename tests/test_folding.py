"""BatchNorm folded into convolutions for fp32 inference: exact, never applied where it would be wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from graft.speed.folding import fold_batchnorm, foldable_pairs, folded_for_inference, same_outputs
from graft.training.features import extract_features


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)  # the architecture-only models' random weights


def _with_running_statistics(model: nn.Module) -> nn.Module:
    """Architecture-only models have BatchNorm at identity; give them statistics to fold."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return model.eval()


def _norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_the_bundled_backbone_folds_every_batchnorm_and_keeps_its_features(lite0, fashion_folder: Path) -> None:
    from graft.input.data import load_labelled_folder

    model = lite0.model
    before = _state(model)
    probe = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    assert len(foldable_pairs(model, probe)) == 49 == _norms(model)
    folded = fold_batchnorm(model, probe)
    assert folded is not model and _norms(folded) == 0
    assert not any(p.requires_grad for p in folded.parameters())
    # The model itself, whose weights train and go into bundles, is untouched.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert _norms(model) == 49

    split = load_labelled_folder(fashion_folder)[0]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRAFT_FOLD_BATCHNORM", "0")
        eager = extract_features(lite0, split.paths, split.digests, cache=None, precision="fp32")
    fast = extract_features(lite0, split.paths, split.digests, cache=None, precision="fp32")
    assert float((fast - eager).norm() / eager.norm()) < 1e-5
    assert torch.allclose(fast, eager, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["resnet18", "regnetx_002", "mobilenetv3_small_100"])
def test_cnns_built_from_timm_fold_to_the_same_outputs(name: str) -> None:
    model = _with_running_statistics(timm.create_model(name, pretrained=False, num_classes=0))
    probe = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    folded = fold_batchnorm(model, probe)
    assert folded is not model and _norms(folded) == 0
    other = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(4))  # not the probe the check ran on
    with torch.no_grad():
        assert same_outputs(folded(other), model(other))


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "convnext_atto"])
def test_models_without_conv_batchnorm_pairs_are_returned_as_they_are(name: str) -> None:
    model = timm.create_model(name, pretrained=False, num_classes=0).eval()
    assert fold_batchnorm(model, torch.randn(1, 3, 224, 224)) is model


class _ConvOutputAlsoSkips(nn.Module):
    """conv → bn, and the conv's raw output added back: folding the bn would change the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class _InPlaceBetween(nn.Module):
    """conv → in-place ReLU → bn: the bn's input is the conv's output tensor, but changed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.act(self.conv(x)))


class _NormCalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.bn(self.conv(x)))


@pytest.mark.parametrize("cls", [_ConvOutputAlsoSkips, _InPlaceBetween, _NormCalledTwice])
def test_a_fold_that_would_change_the_outputs_is_not_made(cls: type[nn.Module]) -> None:
    model = _with_running_statistics(cls())
    probe = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    assert fold_batchnorm(model, probe) is model


def test_the_folded_copy_is_made_again_after_the_weights_change() -> None:
    generator = torch.Generator().manual_seed(3)
    model = _with_running_statistics(timm.create_model("resnet18", pretrained=False, num_classes=0))
    first = folded_for_inference(model, (3, 32, 32))
    assert folded_for_inference(model, (3, 32, 32)) is first  # cached while nothing changes
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model(torch.randn(4, 3, 32, 32, generator=generator)).square().mean().backward()
    optimizer.step()  # in place: the tensors' versions move, and BatchNorm's statistics too
    model.eval()
    second = folded_for_inference(model, (3, 32, 32))
    assert second is not first and second is not model
    x = torch.randn(2, 3, 32, 32, generator=generator)
    with torch.no_grad():
        assert same_outputs(second(x), model(x))
        assert not same_outputs(first(x), model(x))


def test_a_model_that_does_not_fold_is_not_kept_alive_by_the_cache() -> None:
    import gc
    import weakref

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=1).eval()
    assert folded_for_inference(model, (3, 224, 224)) is model
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_folding_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _with_running_statistics(timm.create_model("resnet18", pretrained=False, num_classes=0))
    monkeypatch.setenv("GRAFT_FOLD_BATCHNORM", "0")
    assert folded_for_inference(model, (3, 32, 32)) is model


def test_fp32_extraction_runs_through_a_folded_copy_and_bf16_does_not(lite0, fashion_folder: Path) -> None:
    import copy

    from graft.speed import folding
    from graft.input.data import load_labelled_folder

    split = load_labelled_folder(fashion_folder)[0]
    paths, digests = split.paths[:4], split.digests[:4]
    for precision, folds in (("fp32", True), ("bf16", False)):
        model = copy.deepcopy(lite0.model)  # a model no other test has folded
        extract_features(lite0, paths, digests, cache=None, precision=precision, model=model)
        entry = folding._FOLDED.get(model)
        assert (entry is not None and entry.module is not None and _norms(entry.module) == 0) is folds, precision


def test_an_fp32_bundle_predicts_as_without_folding(trained_run, holdout_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import graft
    from graft.input.data import load_labelled_folder
    from graft.input.images import load_image

    from graft.speed import folding

    bundle = graft.load_bundle(trained_run.bundle_dir)  # a fresh model: nothing folded it yet
    bundle.precision = "fp32"
    images = [load_image(p) for p in load_labelled_folder(holdout_folder)[0].paths]
    folded = bundle.logits(images)
    entry = folding._FOLDED.get(bundle.model)  # made by `logits` itself
    assert entry is not None and entry.module is not None and _norms(entry.module) == 0
    monkeypatch.setenv("GRAFT_FOLD_BATCHNORM", "0")
    eager = bundle.logits(images)
    assert torch.allclose(folded, eager, atol=1e-4, rtol=1e-4)
    assert torch.equal(folded.argmax(1), eager.argmax(1))


@pytest.mark.parametrize("strategy, options, input_size", [
    ("full", {}, (3, 224, 224)),  # validation through the whole model, from images
    ("partial", {"train_stages": 2, "augment_views": 1}, (112, 14, 14)),  # through the top stages, on cached prefix outputs
])
def test_fp32_validation_while_training_runs_a_folded_copy_of_each_epochs_weights(
    fashion_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str, options: dict, input_size: tuple,
) -> None:
    """Every epoch's validation (and the final logits) in fp32 runs the model with BatchNorm folded,
    folded again after each epoch's updates; the validation losses are the unfolded model's."""
    import graft

    from graft.speed import folding

    real, folds = folding.folded_for_inference, []

    def spy(model: nn.Module, size: tuple) -> nn.Module:
        network = real(model, size)
        folds.append((tuple(size), network is not model and _norms(network) == 0))
        return network

    monkeypatch.setattr(folding, "folded_for_inference", spy)
    # A cache of its own: features another test cached for these files would spare the data check's pass.
    monkeypatch.setenv("GRAFT_CACHE_DIR", str(tmp_path / "cache"))
    settings = {"strategy": strategy, "precision": "fp32", "epochs": 2, "patience": 2, "verbose": False, **options}
    folded = graft.train(fashion_folder, out=tmp_path / "folded", **settings)
    validations = [fold for fold in folds if fold[0] == input_size]
    # Two epochs, the final logits, and from whole images the "none of these" detector's passes over
    # the training and validation images through the fine-tuned backbone and the data check's pass
    # through the pretrained one.
    after_training = 3 if input_size == (3, 224, 224) else 0
    assert len(validations) == 2 + 1 + after_training and all(done for _, done in validations)
    monkeypatch.setenv("GRAFT_FOLD_BATCHNORM", "0")
    eager = graft.train(fashion_folder, out=tmp_path / "eager", **settings)
    assert [r.val_loss for r in folded.history] == pytest.approx([r.val_loss for r in eager.history], rel=1e-4, abs=1e-5)
    assert folded.metrics["accuracy"] == eager.metrics["accuracy"]
