"""`precision="auto"` on a CPU with native bf16: the faster of fp32 and bf16, measured once and remembered."""

import json

import pytest
import torch

import graft
from graft.speed import cpu_precision
from graft.speed.cpu_precision import RECORD_FILE, choose_cpu_precision, faster_precision, record_key
from graft.speed.numerics import cpu_supports_bf16

needs_bf16 = pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16: auto is fp32 there, nothing to measure")


def test_bf16_is_chosen_only_when_clearly_faster() -> None:
    assert faster_precision(100.0, 90.0) == "fp32"
    assert faster_precision(100.0, 105.0) == "fp32"  # a near-tie goes to the exact one
    assert faster_precision(100.0, 111.0) == "bf16"


@needs_bf16
def test_the_real_backbone_is_timed_once_and_the_choice_remembered(lite0, tmp_path, monkeypatch) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    first = choose_cpu_precision(lite0, tmp_path)
    # The timing leaves the global generator alone (it seeds the run's head and batches).
    after_timing = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(after_timing, torch.rand(4))
    assert first.measured_now and first.fp32_images_per_second > 0 and first.bf16_images_per_second > 0
    assert first.precision == faster_precision(first.fp32_images_per_second, first.bf16_images_per_second)
    record = json.loads((tmp_path / RECORD_FILE).read_text())
    assert record[record_key(lite0)]["precision"] == first.precision

    def no_timing(backbone):
        raise AssertionError("timed again although the choice was recorded")

    monkeypatch.setattr(cpu_precision, "forward_speeds", no_timing)
    again = choose_cpu_precision(lite0, tmp_path)
    assert not again.measured_now and again.precision == first.precision
    # An unreadable record is measured again and written whole.
    (tmp_path / RECORD_FILE).write_text("{not json")
    monkeypatch.setattr(cpu_precision, "forward_speeds", lambda backbone: (100.0, 150.0))
    assert choose_cpu_precision(lite0, tmp_path).precision == "bf16"
    assert json.loads((tmp_path / RECORD_FILE).read_text())[record_key(lite0)]["precision"] == "bf16"


@needs_bf16
@pytest.mark.parametrize("recorded", ["fp32", "bf16"])
def test_a_run_trains_in_the_recorded_precision_and_says_so(recorded, lite0, fashion_folder, tmp_path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    speeds = {"fp32": 100.0, "bf16": 200.0 if recorded == "bf16" else 90.0}
    (cache / RECORD_FILE).write_text(json.dumps({record_key(lite0): {
        "precision": recorded, "fp32_images_per_second": speeds["fp32"], "bf16_images_per_second": speeds["bf16"]}}))
    run = graft.train(fashion_folder, out=tmp_path / "run", strategy="feature-extract", epochs=1, verbose=False, cache_dir=str(cache))
    resolved = json.loads((run.run_dir / "config.json").read_text())["resolved"]
    assert resolved["precision"] == recorded
    assert resolved["precision_measured"] == {"precision": recorded, "fp32_images_per_second": 100.0,
                                              "bf16_images_per_second": speeds["bf16"]}
    assert graft.load_bundle(run.bundle_dir).meta["precision"] == recorded
    # An explicit precision is used as given, with nothing measured.
    explicit = graft.train(fashion_folder, out=tmp_path / "explicit", strategy="feature-extract", epochs=1, precision="fp32",
                           verbose=False, cache_dir=str(cache))
    resolved = json.loads((explicit.run_dir / "config.json").read_text())["resolved"]
    assert resolved["precision"] == "fp32" and "precision_measured" not in resolved
