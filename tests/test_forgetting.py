"""Forgetting per stage: linear CKA's math, weight drift, and both on a real trained model."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from graft.models.stages import discover_stages
from graft.report.forgetting import linear_cka, stage_forgetting, weight_drift


@pytest.fixture
def features() -> torch.Tensor:
    return torch.randn(40, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_cka_of_a_representation_with_itself_is_one(features):
    assert linear_cka(features, features) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling(features):
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    assert linear_cka(features, features @ q) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(features, 7.5 * features) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(features, features + 3.0) == pytest.approx(1.0, abs=1e-10)  # centering removes shifts
    # ... but not to anisotropic scaling: that changes the representation's geometry.
    stretched = features * torch.linspace(0.1, 10, 12, dtype=torch.float64)
    assert linear_cka(features, stretched) < 0.9


def test_cka_matches_the_feature_space_formula_and_is_symmetric(features):
    other = torch.randn(40, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    other = torch.cat([other, features[:, :3]], dim=1)  # partly shared, different width
    x, y = features - features.mean(0), other - other.mean(0)
    # Kornblith et al. (2019), eq. 4: ||Yᵀ X||²_F / (||Xᵀ X||_F ||Yᵀ Y||_F).
    expected = float(torch.linalg.norm(y.T @ x) ** 2 / (torch.linalg.norm(x.T @ x) * torch.linalg.norm(y.T @ y)))
    assert linear_cka(features, other) == pytest.approx(expected, rel=1e-10)
    assert linear_cka(other, features) == pytest.approx(expected, rel=1e-10)
    assert 0.0 < expected < 1.0


def test_cka_of_unrelated_representations_is_low():
    generator = torch.Generator().manual_seed(3)
    a, b = torch.randn(500, 4, generator=generator), torch.randn(500, 4, generator=generator)
    assert linear_cka(a, b) < 0.05


def test_cka_flattens_feature_maps_and_checks_its_inputs():
    maps = torch.randn(6, 4, 5, 5, generator=torch.Generator().manual_seed(4))
    assert linear_cka(maps, maps.flip(1)) == pytest.approx(1.0, abs=1e-9)  # a channel permutation is orthogonal
    with pytest.raises(ValueError, match="same number of rows"):
        linear_cka(maps, maps[:5])


def test_weight_drift_on_known_values():
    before = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0])}
    assert weight_drift(before, before, ["w", "b"]) == 0.0
    assert weight_drift({"w": torch.tensor([6.0, 8.0]), "b": torch.tensor([0.0])}, before, ["w", "b"]) == pytest.approx(1.0)
    assert weight_drift({"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([5.0])}, before, ["w", "b"]) == pytest.approx(1.0)
    assert weight_drift({"w": torch.tensor([3.0, 4.0])}, before, ["w", "b"]) is None  # a missing parameter


@pytest.fixture(scope="module")
def val_batch(trained_run):
    from graft.shipping.bundle import load_bundle
    from graft.input.images import load_image

    split = json.loads((trained_run.run_dir / "split.json").read_text())
    root = json.loads((trained_run.run_dir / "metrics.json").read_text())["data"]["root"]
    bundle = load_bundle(trained_run.bundle_dir)
    return torch.stack([bundle.transform(load_image(f"{root}/{path}")) for path, _ in split["val"]])


def test_feature_extract_leaves_every_stage_untouched_measured(trained_run, lite0, val_batch):
    from graft.shipping.bundle import load_bundle

    trained = load_bundle(trained_run.bundle_dir).model.backbone
    # skip_unchanged=False: CKA really computed from both backbones' features on real images.
    rows = stage_forgetting(trained, lite0.model, val_batch, skip_unchanged=False)
    assert len(rows) == len(discover_stages(lite0.model))
    for row in rows:
        assert row.drift == 0.0 and row.unchanged
        assert row.cka == pytest.approx(1.0, abs=1e-6)


def test_the_run_records_forgetting_json(trained_run):
    recorded = json.loads((trained_run.run_dir / "forgetting.json").read_text())
    assert recorded["stages"] and all(r["drift"] == 0.0 and r["cka"] == 1.0 for r in recorded["stages"])
    assert recorded["images"] == 0  # nothing changed: no forward pass was needed


def test_a_changed_stage_drifts_and_changes_the_features_after_it(lite0, val_batch):
    stages = discover_stages(lite0.model)
    changed = copy.deepcopy(lite0.model)
    target = stages[5]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in changed.named_parameters():
            if name in target.param_names:
                parameter.add_(0.3 * parameter.std() * torch.randn(parameter.shape, generator=generator))
    rows = stage_forgetting(changed, lite0.model, val_batch, stages=stages)
    for row in rows[:5]:
        assert row.drift == 0.0 and row.cka == 1.0 and row.unchanged
    assert 0.1 < rows[5].drift < 0.6 and not rows[5].unchanged
    assert rows[5].cka < 0.999
    for row in rows[6:]:
        assert row.drift == 0.0 and not row.unchanged and row.cka < 0.999
