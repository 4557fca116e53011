"""Each strategy on a small real folder: what must stay frozen stays bitwise frozen, the rest moves."""

import numpy as np
import pytest
import torch

import graft
from graft.config import TrainConfig
from graft.models.backbones import load_backbone
from graft.models.model import GraftModel
from graft.models.stages import discover_stages
from graft.shipping.bundle import load_bundle
from graft.strategies import STRATEGY_NAMES, get_strategy
from graft.strategies.finetune import param_groups
from torch import nn


@pytest.fixture(scope="module")
def pretrained():
    backbone = load_backbone("efficientnet_lite0")
    return backbone.model.state_dict(), discover_stages(backbone.model)


def _moved(pretrained_state, bundle_dir):
    trained = load_bundle(bundle_dir).model.backbone.state_dict()
    return {k: not torch.equal(v, trained[k]) for k, v in pretrained_state.items()}


def _stage_keys(stage, state):
    prefixes = tuple(m + "." for m in stage.module_names)
    return [k for k in state if k.startswith(prefixes)]


def test_every_strategy_is_registered():
    for name in ("feature-extract", "linear-probe", "partial", "full", "discriminative", "gradual", "lp-ft", "lora"):
        assert name in STRATEGY_NAMES


def test_partial_trains_the_last_stages_only(fashion_folder, tmp_path, pretrained):
    state, stages = pretrained
    run = graft.train(fashion_folder, out=tmp_path / "p", strategy="partial", train_stages=2, epochs=2, augment_views=1,
                      bn_stats="update", verbose=False)
    assert run.metrics["cached_prefix"] == "blocks.4"  # the frozen prefix ran once per image, cached
    moved = _moved(state, run.bundle_dir)
    for stage in stages[:-2]:
        for key in _stage_keys(stage, state):
            assert not moved[key], f"{key} of frozen stage {stage.name} changed"
    for stage in stages[-2:]:
        weights = [k for k in _stage_keys(stage, state) if k.endswith("weight")]
        assert any(moved[k] for k in weights), f"trainable stage {stage.name} did not move"
        running = [k for k in _stage_keys(stage, state) if "running_mean" in k]
        assert any(moved[k] for k in running), "BatchNorm of a trained stage keeps learning its statistics"


def test_small_data_freezes_batchnorm_statistics_even_where_weights_train(fashion_folder, tmp_path, pretrained):
    import json

    state, stages = pretrained
    # 10 images per class: --bn-stats auto resolves to frozen; the whole network trains.
    run = graft.train(fashion_folder, out=tmp_path / "f", strategy="full", epochs=1, verbose=False)
    assert json.loads((run.run_dir / "config.json").read_text())["resolved"]["bn_stats"] == "frozen"
    moved = _moved(state, run.bundle_dir)
    statistics = [k for k in state if "running_" in k or "num_batches" in k]
    assert statistics and not any(moved[k] for k in statistics)
    assert any(moved[k] for k in state if k.endswith("bn2.weight"))  # BN affine parameters still train
    assert sum(moved[k] for k in state if k.endswith("conv_pw.weight")) > 10


def test_train_bn_moves_only_affine_parameters_of_frozen_stages(fashion_folder, tmp_path, pretrained):
    state, stages = pretrained
    run = graft.train(fashion_folder, out=tmp_path / "bn", strategy="partial", train_stages=1, train_bn=True, epochs=1, verbose=False)
    moved = _moved(state, run.bundle_dir)
    frozen = [k for stage in stages[:-1] for k in _stage_keys(stage, state)]
    assert any(moved[k] for k in frozen if k.endswith("bn1.weight") or k.endswith("bn1.bias"))
    assert not any(moved[k] for k in frozen if "running_" in k or "num_batches" in k)
    assert not any(moved[k] for k in frozen if "conv" in k)


def test_gradual_thaws_one_stage_per_epoch_from_the_top(fashion_folder, tmp_path, pretrained):
    state, stages = pretrained
    run = graft.train(fashion_folder, out=tmp_path / "g", strategy="gradual", thaw_every=1, epochs=3, patience=10, verbose=False)
    notes = [r.stage_thawed for r in run.history]
    assert notes == [None, f"thawed {stages[-1].name}", f"thawed {stages[-2].name}"]
    moved = _moved(state, run.bundle_dir)
    assert not any(moved[k] for k in _stage_keys(stages[-3], state))
    assert any(moved[k] for k in _stage_keys(stages[-2], state) if k.endswith("weight"))


def test_discriminative_rates_decay_toward_the_input(fashion_folder, tmp_path, pretrained):
    _, stages = pretrained
    config = TrainConfig(data=".", out=".", strategy="discriminative", lr=1e-3, lr_decay=0.5)
    plan = get_strategy("discriminative").plan(stages, config)
    model = GraftModel(load_backbone().model, nn.Linear(1280, 3))
    groups = param_groups(model, stages, plan, 0.0)
    rates = [g["lr"] for g in groups]
    assert rates[-1] == 1e-3 and groups[-1]["name"] == "head"
    for earlier, later in zip(rates[:-1], rates[1:]):
        assert earlier == pytest.approx(0.5 * later)
    run = graft.train(fashion_folder, out=tmp_path / "d", strategy="discriminative", lr_decay=0.5, epochs=1, verbose=False)
    recorded = run.history[0].lr
    assert len(recorded) == len(stages) + 1
    assert recorded[0] / recorded[-1] == pytest.approx(0.5 ** len(stages), rel=0.02)


def test_full_moves_every_stage_and_lp_ft_starts_from_a_probe(fashion_folder, tmp_path, pretrained):
    state, stages = pretrained
    run = graft.train(fashion_folder, out=tmp_path / "f", strategy="full", epochs=1, verbose=False)
    moved = _moved(state, run.bundle_dir)
    for stage in stages:
        assert any(moved[k] for k in _stage_keys(stage, state)), stage.name
    lpft = graft.train(fashion_folder, out=tmp_path / "lpft", strategy="lp-ft", epochs=1, verbose=False)
    assert lpft.metrics["strategy"] == "lp-ft" and lpft.metrics["accuracy"] >= 0.5


def test_lp_ft_can_fine_tune_only_the_top_stages(fashion_folder, tmp_path, pretrained):
    """The top 2 stages fine-tune on the cached prefix; the rest stays bitwise frozen. The bundle
    holds whichever validated better: a fine-tuning epoch, or the probe it started from."""
    state, stages = pretrained
    run = graft.train(fashion_folder, out=tmp_path / "lpft2", strategy="lp-ft", train_stages=2, epochs=2, augment_views=1,
                      verbose=False, cache_dir=str(tmp_path / "cache"))
    assert run.metrics["cached_prefix"] == "blocks.4"  # the frozen prefix is computed once and cached
    # Its outputs for the plain view were kept from the probe's full pass over the same images;
    # the prefix itself ran only over the one augmented view of the training images.
    assert run.metrics["prefix_outputs_kept"] == 36 == run.metrics["num_train"] + run.metrics["num_val"]
    assert run.metrics["features_computed"] == run.metrics["num_train"]
    moved = _moved(state, run.bundle_dir)
    for stage in stages[:-2]:
        assert not any(moved[k] for k in _stage_keys(stage, state)), f"frozen stage {stage.name} changed"
    start, epochs = run.metrics["start_val_accuracy"], [record.val_accuracy for record in run.history]
    assert len(epochs) == 2
    assert run.metrics["probe_epochs_run"] > 2  # the probe trains to its own budget, not the fine-tuning's --epochs
    assert run.metrics["accuracy"] == pytest.approx(max([start, *epochs]), abs=1e-6)
    top_moved = [any(moved[k] for k in _stage_keys(stage, state) if k.endswith("weight")) for stage in stages[-2:]]
    if run.metrics["best_epoch"] == -1:  # no epoch beat the probe: the pretrained stages come back untouched
        assert all(accuracy <= start for accuracy in epochs)
        assert not any(top_moved)
    else:
        assert epochs[run.metrics["best_epoch"]] >= start
        assert all(top_moved)
    audit = {row.stage: row for row in graft.inspect("efficientnet_lite0", strategy="lp-ft", train_stages=2).audit}
    assert [audit[s.name].trainable_params > 0 for s in stages] == [False] * (len(stages) - 2) + [True, True]


def test_lora_trains_adapters_and_reloads_identically(fashion_folder, holdout_folder, tmp_path, pretrained):
    state, _ = pretrained
    run = graft.train(fashion_folder, out=tmp_path / "lora", strategy="lora", lora_rank=4, epochs=1, verbose=False)
    bundle = load_bundle(run.bundle_dir)
    assert bundle.meta["adapters"]["kind"] == "lora" and bundle.meta["adapters"]["rank"] == 4
    trained = bundle.model.backbone.state_dict()
    adapters = [k for k in trained if "lora_B" in k]
    assert adapters and any(trained[k].abs().sum() > 0 for k in adapters)  # B starts at zero
    for key, value in state.items():  # base weights and BatchNorm buffers untouched
        base = key.replace(".weight", ".base_layer.weight") if key.replace(".weight", ".base_layer.weight") in trained else key
        assert torch.equal(value, trained[base]), key
    images = sorted(holdout_folder.rglob("*.png"))
    first = [p.to_dict() for p in bundle.predict(images)]
    assert first == [p.to_dict() for p in load_bundle(run.bundle_dir).predict(images)]


def test_lora_on_a_vision_transformer(fashion_folder, tmp_path):
    # No ViT weights can be had offline: random ones from a file exercise the same code path.
    import timm
    from safetensors.torch import save_file

    weights = tmp_path / "vit.safetensors"
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(weights))
    run = graft.train(fashion_folder, out=tmp_path / "vit", backbone="vit_tiny_patch16_224", weights=str(weights),
                      strategy="lora", lora_rank=2, epochs=1, verbose=False)
    bundle = load_bundle(run.bundle_dir)
    assert any("attn.qkv.lora_A" in k for k in bundle.model.state_dict())
    assert len(bundle.predict(sorted(fashion_folder.rglob("*.png"))[:2])) == 2


def test_train_stages_larger_than_the_backbone_is_refused_before_work(fashion_folder, tmp_path):
    with pytest.raises(graft.ConfigError, match="1 to 8"):
        graft.inspect("efficientnet_lite0", strategy="partial", train_stages=9)


@pytest.mark.parametrize("class_weighting", ["none", "balanced"])
def test_the_lbfgs_head_solves_scikit_learns_logistic_regression(class_weighting):
    # A numerical check of the solver against the reference on the same (random, imbalanced) rows;
    # that the grid's head predicts like scikit-learn's probe on real images is in test_pooling.
    from sklearn.linear_model import LogisticRegression

    from graft.strategies.feature_extract import class_weights, solve_logistic_regression

    generator = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate((40, 12, 5))])
    inputs = torch.randn(len(labels), 30, generator=generator) + labels[:, None].float() * 0.3
    linear = torch.nn.Linear(30, 3)
    solve_logistic_regression(linear, inputs, labels, class_weight=class_weights(labels, 3, class_weighting))
    reference = LogisticRegression(C=1.0, class_weight=None if class_weighting == "none" else "balanced", tol=1e-8,
                                   max_iter=10_000).fit(inputs.numpy(), labels.numpy())
    with torch.no_grad():
        ours = torch.softmax(linear(inputs), 1).numpy()
    assert np.abs(ours - reference.predict_proba(inputs.numpy())).max() < 1e-3
    if class_weighting == "balanced":  # the weights matter: unweighted, the smallest class gets less
        unweighted = torch.nn.Linear(30, 3)
        solve_logistic_regression(unweighted, inputs, labels)
        with torch.no_grad():
            assert torch.softmax(unweighted(inputs), 1)[:, 2].mean() < ours[:, 2].mean()
