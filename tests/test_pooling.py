"""Grid pooling: the module, the backbone view, training, the bundle and the ONNX export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import graft
from graft.models.backbones import load_backbone, with_crop, with_pooling
from graft.models.pooling import (
    GRID_SIZE, LEVEL_GRIDS, GridPool, LevelPool, earlier_module_names, pooled_model, supports_grid,
)
from graft.shipping.bundle import load_bundle
from graft.training.features import backbone_key


@pytest.mark.parametrize("height, width", [(7, 7), (8, 8), (9, 7), (5, 6), (3, 3), (2, 2)])
def test_grid_cells_are_torchs_adaptive_average_bins(height, width):
    maps = torch.randn(2, 4, height, width, generator=torch.Generator().manual_seed(0))
    expected = F.adaptive_avg_pool2d(maps, GRID_SIZE).flatten(1)
    assert torch.allclose(GridPool()(maps), expected, atol=1e-6)


def test_a_grid_view_shares_the_weights_and_widens_the_features(lite0):
    grid = with_pooling(lite0, "grid")
    assert grid.pooling == "grid" and lite0.pooling == "avg"
    assert grid.num_features == lite0.num_features * GRID_SIZE**2
    assert all(a is b for a, b in zip(grid.model.parameters(), lite0.model.parameters()))
    assert lite0.model.global_pool is not grid.model.global_pool  # the original still averages
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pooled, cells = lite0.model(images), grid.model(images)
        maps = lite0.model.forward_features(images)
    assert cells.shape == (2, grid.num_features)
    assert torch.allclose(cells, F.adaptive_avg_pool2d(maps, GRID_SIZE).flatten(1), atol=1e-5)
    back = with_pooling(grid, "avg")
    with torch.no_grad():
        assert torch.equal(back.model(images), pooled)
    # Cached features of the two poolings never mix; the average's key is the one it always had.
    key = backbone_key(lite0, lite0.preprocessing, "fp32")
    assert backbone_key(grid, grid.preprocessing, "fp32") != key
    assert backbone_key(back, back.preprocessing, "fp32") == key


def test_two_stage_grids_read_the_stage_before_the_last_beside_the_last_map(lite0):
    grid2 = with_pooling(lite0, "grid-2")
    assert earlier_module_names(lite0.model, "grid-2") == ("blocks.5",)  # graft.models.stages: the stage before blocks.6+conv_head+bn2
    assert grid2.num_features == (1280 + 192) * GRID_SIZE**2
    # The same weights under the same names (a bundle's state dict loads either way); the original untouched.
    assert list(grid2.model.state_dict()) == list(lite0.model.state_dict())
    assert all(a is b for a, b in zip(grid2.model.parameters(), lite0.model.parameters()))
    assert type(lite0.model.blocks) is torch.nn.Sequential and lite0.model.global_pool is not grid2.model.global_pool
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    kept = {}
    hook = lite0.model.blocks[5].register_forward_hook(lambda _m, _i, output: kept.setdefault("earlier", output))
    with torch.no_grad():
        maps = lite0.model.forward_features(images)
        hook.remove()
        both = grid2.model.eval()(images)
    expected = torch.cat([F.adaptive_avg_pool2d(maps, GRID_SIZE).flatten(1), F.adaptive_avg_pool2d(kept["earlier"], GRID_SIZE).flatten(1)], 1)
    assert torch.allclose(both, expected, atol=1e-5)
    assert grid2.model.blocks.recorded == {}  # read and let go within the pass
    assert with_pooling(grid2, "avg").model is lite0.model and with_pooling(grid2, "grid").num_features == 1280 * GRID_SIZE**2
    assert len({backbone_key(b, b.preprocessing, "fp32") for b in (lite0, grid2, with_pooling(lite0, "grid"))}) == 3


def _hooked_grids(model, images, names_and_sizes):
    """The reference: each named module's output on a grid of its size, read by forward hooks."""
    kept, hooks = {}, []
    for name, _ in names_and_sizes:
        hooks.append(model.get_submodule(name).register_forward_hook(lambda _m, _i, out, name=name: kept.setdefault(name, out)))
    with torch.no_grad():
        model.eval()(images)
    for hook in hooks:
        hook.remove()
    return torch.cat([F.adaptive_avg_pool2d(kept[name], size).flatten(1) for name, size in names_and_sizes], 1)


def test_three_stage_grids_add_a_finer_grid_of_the_stage_before_that(lite0):
    grid3 = with_pooling(lite0, "grid-3")
    assert earlier_module_names(lite0.model, "grid-3") == ("blocks.5", "blocks.4") and LEVEL_GRIDS == (3, 3, 5)
    assert grid3.num_features == (1280 + 192) * 9 + 112 * 25  # blocks.4's 14x14 map on a 5x5 grid
    assert list(grid3.model.state_dict()) == list(lite0.model.state_dict())
    assert all(a is b for a, b in zip(grid3.model.parameters(), lite0.model.parameters()))
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    expected = _hooked_grids(lite0.model, images, [("bn2", 3), ("blocks.5", 3), ("blocks.4", 5)])
    with torch.no_grad():
        assert torch.allclose(grid3.model.eval()(images), expected, atol=1e-5)
    assert grid3.model.blocks.recorded == {} and grid3.model.blocks.indices == (5, 4)
    assert with_pooling(grid3, "avg").model is lite0.model
    assert len({backbone_key(b, b.preprocessing, "fp32") for b in (lite0, grid3, with_pooling(lite0, "grid-2"))}) == 3


def test_grids_of_a_resnet_read_its_third_and_second_layers_and_a_mobilenet_refuses_them():
    resnet = load_backbone("resnet18", pretrained=False)
    assert earlier_module_names(resnet.model, "grid-2") == ("layer3.1",)
    assert with_pooling(resnet, "grid-2").num_features == (512 + 256) * GRID_SIZE**2
    # Two earlier stages in two containers: each is recorded by its own copy.
    grid3 = with_pooling(resnet, "grid-3")
    assert earlier_module_names(resnet.model, "grid-3") == ("layer3.1", "layer2.1")
    assert grid3.num_features == (512 + 256) * 9 + 128 * 25
    images = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(4))
    expected = _hooked_grids(resnet.model, images, [("layer4", 3), ("layer3", 3), ("layer2", 5)])
    with torch.no_grad():
        assert torch.allclose(grid3.model.eval()(images), expected, atol=1e-5)
    assert list(grid3.model.state_dict()) == list(resnet.model.state_dict())
    mobilenet = load_backbone("mobilenetv3_small_100", pretrained=False)  # pools, then a 1x1 convolution
    assert not supports_grid(mobilenet.model)
    with pytest.raises(graft.ConfigError, match="--pooling grid-2.*MobileNetV3.*use --pooling avg"):
        with_pooling(mobilenet, "grid-2")


@pytest.mark.parametrize("pooling", ["grid", "grid-2", "grid-3"])
def test_grids_pooled_on_the_side_of_the_averages_pass_are_the_grid_backbones_features(lite0, holdout_folder, tmp_path, pooling):
    from graft.training.features import FeatureCache, SidePooling, extract_features

    paths = sorted(holdout_folder.rglob("*.png"))[:8]
    digests = [p.stem for p in paths]
    grid = with_pooling(lite0, pooling)
    side = FeatureCache(tmp_path, backbone_key(grid, grid.preprocessing, "fp32"))
    earlier = earlier_module_names(lite0.model, pooling)
    averages = extract_features(lite0, paths, digests, cache=None, precision="fp32", batch_size=3,
                                side_poolings=[SidePooling(pooling, side, earlier)])
    assert averages.shape == (8, lite0.num_features)
    cached = FeatureCache(tmp_path, side.key).get(digests)  # from disk, as auto's next step reads them
    assert sorted(cached) == sorted(digests)
    own = extract_features(grid, paths, digests, cache=None, precision="fp32", batch_size=3)
    assert torch.allclose(torch.stack([cached[d] for d in digests]), own, atol=1e-5)
    # Nothing computed, nothing pooled on the side: the cached averages' pass adds no grid rows.
    again = FeatureCache(tmp_path, "elsewhere")
    extract_features(lite0, paths, digests, cache=FeatureCache(tmp_path, "avg-cached"), precision="fp32")
    extract_features(lite0, paths, digests, cache=FeatureCache(tmp_path, "avg-cached"), precision="fp32",
                     side_poolings=[SidePooling(pooling, again, earlier)])
    assert not again.folder.exists()


def test_a_grid_pass_pools_the_deeper_grid_on_the_side_too(lite0, holdout_folder, tmp_path):
    """auto's pooling ladder: where a grid's pass runs (its cache missed), it pools the later grids
    as well, through the grid model's recording copy of `blocks` and its `LevelPool`."""
    from graft.training.features import FeatureCache, SidePooling, extract_features

    paths = sorted(holdout_folder.rglob("*.png"))[:6]
    digests = [p.stem for p in paths]
    grid2, grid3 = with_pooling(lite0, "grid-2"), with_pooling(lite0, "grid-3")
    side = FeatureCache(tmp_path, backbone_key(grid3, grid3.preprocessing, "fp32"))
    own2 = extract_features(grid2, paths, digests, cache=None, precision="fp32", batch_size=4,
                            side_poolings=[SidePooling("grid-3", side, earlier_module_names(lite0.model, "grid-3"))])
    cached = side.get(digests)
    own3 = extract_features(grid3, paths, digests, cache=None, precision="fp32", batch_size=4)
    assert torch.allclose(torch.stack([cached[d] for d in digests]), own3, atol=1e-5)
    assert torch.allclose(own2, own3[:, :grid2.num_features], atol=1e-5)  # grid-2's levels come first


@pytest.mark.parametrize("architecture", ["vit_tiny_patch16_224", "convnext_atto"])
def test_a_backbone_that_does_not_pool_a_map_last_refuses_a_grid(architecture):
    backbone = load_backbone(architecture, pretrained=False)
    with pytest.raises(graft.ConfigError, match="--pooling grid.*use --pooling avg"):
        with_pooling(backbone, "grid")
    assert pooled_model(backbone.model, "avg") is backbone.model


def test_the_audit_of_a_grid_head_names_its_solver_instead_of_a_learning_rate():
    grid = graft.inspect("efficientnet_lite0", pretrained=False, strategy="feature-extract", pooling="grid").audit[-1]
    assert (grid.stage, grid.lr) == ("head (L-BFGS)", None)
    assert grid.trainable_params == 1280 * GRID_SIZE**2 * 2 + 2
    average = graft.inspect("efficientnet_lite0", pretrained=False, strategy="feature-extract").audit[-1]
    assert (average.stage, average.lr) == ("head", 1e-3)
    epochs = graft.inspect("efficientnet_lite0", pretrained=False, strategy="feature-extract", pooling="grid",
                           head_solver="adamw").audit[-1]
    assert (epochs.stage, epochs.lr) == ("head", 1e-3)


def test_bad_pooling_and_solver_options_are_named(fashion_folder, tmp_path):
    with pytest.raises(graft.ConfigError, match="^pooling: 'max'"):
        graft.TrainConfig(data=str(fashion_folder), out=str(tmp_path), pooling="max")
    with pytest.raises(graft.ConfigError, match="--head-solver lbfgs: fits a linear head only"):
        graft.train(fashion_folder, strategy="feature-extract", out=tmp_path / "mlp", head="mlp", head_solver="lbfgs", verbose=False)


@pytest.fixture(scope="module", params=["grid", "grid-3"])
def grid_run(fashion_folder, tmp_path_factory, request):
    out = tmp_path_factory.mktemp(request.param) / "run"
    return graft.train(fashion_folder, strategy="feature-extract", out=out, pooling=request.param, crop_pct=1.0, verbose=False)


def test_grid_head_is_scikit_learns_logistic_regression_and_reloads_identically(grid_run, fashion_folder, holdout_folder, lite0):
    from sklearn.linear_model import LogisticRegression

    from graft.input.data import load_dataset
    from graft.training.features import extract_features
    from graft.input.images import load_image

    bundle = load_bundle(grid_run.bundle_dir)
    pooling = bundle.meta["backbone"]["pooling"]
    assert pooling == json.loads((grid_run.run_dir / "config.json").read_text())["pooling"]
    assert bundle.meta["head"]["in_features"] == {"grid": 1280 * 9, "grid-3": (1280 + 192) * 9 + 112 * 25}[pooling]
    assert isinstance(bundle.model.backbone.global_pool, GridPool if pooling == "grid" else LevelPool)
    assert len(grid_run.history) == 1  # solved once by L-BFGS, not in epochs
    # The same objective as scikit-learn's probe: its predictions on held-out images agree.
    dataset = load_dataset(str(fashion_folder), val_fraction=0.2, seed=0)
    grid = with_pooling(load_backbone("efficientnet_lite0"), pooling)
    grid = with_crop(grid, 1.0)
    train = extract_features(grid, dataset.train.paths, dataset.train.digests, cache=None, precision="fp32").numpy()
    holdout = sorted(holdout_folder.rglob("*.png"))
    probe = LogisticRegression(max_iter=2000).fit(train, dataset.train.labels)
    ours = bundle.logits([load_image(p) for p in holdout]).argmax(1).numpy()
    theirs = probe.predict(extract_features(grid, holdout, [str(p) for p in holdout], cache=None, precision="fp32").numpy())
    assert np.mean(ours == theirs) >= 0.94
    # Reloaded, it predicts the same.
    first = [p.to_dict() for p in bundle.predict(holdout)]
    assert first == [p.to_dict() for p in load_bundle(grid_run.bundle_dir).predict(holdout)]


def test_a_grid_bundle_exports_to_onnx_with_the_same_logits(grid_run, holdout_folder, tmp_path):
    pytest.importorskip("onnxruntime")
    from graft.shipping.export import export_onnx
    from graft.input.images import load_image

    images = [load_image(p) for p in sorted(holdout_folder.rglob("*.png"))]
    # export_onnx checks ONNX Runtime's logits against PyTorch's on these images and refuses otherwise.
    result = export_onnx(load_bundle(grid_run.bundle_dir), out=tmp_path / "grid.onnx", opset=17, check_images=images)
    assert result.path.is_file() and result.num_check_images == len(images)
    assert result.max_abs_diff < result.tolerance
