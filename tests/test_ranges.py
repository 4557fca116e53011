"""Numeric options: every command refuses a value that is not finite, not of its kind or out of range.

The refusal is one line, `graft: error: --option: expected ..., got ...`, exit code 2, before any
work (no run folder, no bundle loaded beyond what the command needs to start).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import graft
from graft.cli.main import main
from graft.config import TrainConfig
from graft.errors import ConfigError


def _refused(capsys, argv: list[str], option: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"graft: error: {option}: expected ") and err.count("\n") == 1, err
    return err


TRAIN_CASES = [
    ("--lr", "inf"),
    ("--lr", "1e30"),
    ("--weight-decay", "nan"),
    ("--weight-decay", "-1"),
    ("--warmup-epochs", "-3"),
    ("--seed", "99999999999999999999"),
    ("--seed", "-1"),
    ("--crop-pct", "0.0001"),
    ("--lora-rank", "100000"),
    ("--batch-size", "1000000"),
    ("--val-fraction", "nan"),
    ("--hidden", "10000000"),
]


@pytest.mark.parametrize("option,value", TRAIN_CASES)
def test_train_refuses_each_out_of_range_number_in_one_line(capsys, fashion_folder, tmp_path, option, value):
    out = tmp_path / "run"
    _refused(capsys, ["train", str(fashion_folder), "--out", str(out), option, value, "--epochs", "1", "-q"], option)
    assert not out.exists()


def test_the_message_gives_the_range():
    with pytest.raises(ConfigError, match=r"^lr: expected a finite number in \(0, 10\] .*, got inf$"):
        TrainConfig(data=".", out=".", lr=float("inf"))
    with pytest.raises(ConfigError, match=r"^seed: expected a whole number from 0 to 4294967295 .*, got 99999999999999999999$"):
        TrainConfig(data=".", out=".", seed=99999999999999999999)
    with pytest.raises(ConfigError, match=r"^epochs: expected a whole number from 1 to 100000, got 2.5$"):
        TrainConfig(data=".", out=".", epochs=2.5)
    with pytest.raises(ConfigError, match=r"^hidden: expected a whole number .*, got True$"):
        TrainConfig(data=".", out=".", hidden=True)


def test_numpy_numbers_are_stored_as_plain_numbers_that_json_holds():
    config = TrainConfig(data=".", out=".", lr=np.float32(0.01), epochs=np.int64(3), dropout=np.float64(0.1), seed=np.uint32(7))
    saved = json.loads(json.dumps(config.to_dict()))
    assert saved["epochs"] == 3 and saved["seed"] == 7 and saved["dropout"] == 0.1
    assert saved["lr"] == pytest.approx(0.01) and type(config.lr) is float and type(config.epochs) is int
    assert TrainConfig.from_dict(saved) == config


@pytest.mark.parametrize("option,value", [("--batch-size", "0"), ("--batch-size", "-1"), ("--batch-size", "100000")])
def test_predict_refuses_out_of_range_numbers(capsys, trained_run, holdout_folder, tmp_path, option, value):
    _refused(capsys, ["predict", str(trained_run.bundle_dir), str(holdout_folder), option, value], option)
    _refused(capsys, ["predict", str(trained_run.bundle_dir), str(holdout_folder), option, value, "--out", str(tmp_path / "p.csv")], option)
    assert not (tmp_path / "p.csv").exists()


def test_the_python_api_checks_batch_size_before_reading_any_image(trained_run, tmp_path):
    bundle = trained_run.load_bundle()
    for batch_size in (0, -5, 10**9, 2.5):
        with pytest.raises(ConfigError, match="^batch_size: expected"):
            bundle.iter_predict([tmp_path / "not-there.png"], batch_size=batch_size)
    with pytest.raises(ConfigError, match="^top_k: expected"):
        bundle.iter_predict([], top_k=0)


@pytest.mark.parametrize("option,value", [("--max-upload-mb", "nan"), ("--max-upload-mb", "inf")])
def test_serve_refuses_out_of_range_numbers(capsys, trained_run, option, value):
    _refused(capsys, ["serve", str(trained_run.bundle_dir), option, value], option)


def test_compare_inspect_and_demo_refuse_out_of_range_numbers(capsys, fashion_folder, tmp_path):
    _refused(capsys, ["compare", str(fashion_folder), "--out", str(tmp_path / "cmp"), "--seed", "-1", "--epochs", "1", "-q"], "--seed")
    assert not (tmp_path / "cmp").exists()
    _refused(capsys, ["inspect", "--strategy", "partial", "--num-classes", "0"], "--num-classes")
    _refused(capsys, ["inspect", "--strategy", "partial", "--lr", "inf"], "--lr")
    _refused(capsys, ["demo", "--out", str(tmp_path / "demo"), "--per-class", "-1"], "--per-class")
    assert not (tmp_path / "demo").exists()


def test_python_api_train_refuses_a_non_finite_rate_before_any_work(fashion_folder, tmp_path):
    with pytest.raises(graft.ConfigError, match=r"^lr: expected a finite number in \(0, 10\]"):
        graft.train(fashion_folder, strategy="feature-extract", out=tmp_path / "x", lr=float("inf"), verbose=False)
    assert not (tmp_path / "x").exists()
