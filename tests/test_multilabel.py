"""Multi-label classification on real images: the CSV, the split, every strategy, metrics, bundle, predict."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import graft
from graft.errors import BundleError, ConfigError, DataError
from graft.input.multilabel import load_multilabel_dataset, load_task_dataset, read_multilabel_csv
from graft.shipping.bundle import load_bundle
from graft.shipping.multilabel import LabelSetPrediction
from graft.training.multilabel import choose_thresholds

def _rows(csv_path: Path) -> list[list[str]]:
    with csv_path.open(newline="") as handle:
        return list(csv.reader(handle))


def _write(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return path


# --- data -------------------------------------------------------------------------------------------


def test_label_sets_are_read_with_images_without_label_kept_as_all_negative(multilabel_csv: Path) -> None:
    names, rows = read_multilabel_csv(multilabel_csv)
    assert names == ["dark", "footwear", "top"]
    assert len(rows) == 60
    assert any(not labels for _, _, labels, _ in rows)  # bright trousers and bags have no label
    assert any(labels == {"top", "dark"} for _, _, labels, _ in rows)


def test_one_column_per_label_reads_as_the_labels_column(multilabel_csv: Path) -> None:
    rows = _rows(multilabel_csv)
    names = ["dark", "footwear", "top"]
    columns = [["path", *names]] + [[path, *("1" if n in labels.split(";") else "0" for n in names)] for path, labels in rows[1:]]
    indicator = _write(multilabel_csv.parent / "columns.csv", columns)
    a, b = load_multilabel_dataset(multilabel_csv, seed=3), load_multilabel_dataset(indicator, seed=3)
    assert a.class_names == b.class_names
    assert a.split_record()["train"] == b.split_record()["train"]
    assert a.train.labels == b.train.labels


def test_the_split_is_seeded_recorded_and_stratified_by_label(multilabel_csv: Path) -> None:
    first = load_task_dataset(multilabel_csv, seed=0, val_fraction=0.25)
    again = load_task_dataset(multilabel_csv, seed=0, val_fraction=0.25)
    other = load_task_dataset(multilabel_csv, seed=1, val_fraction=0.25)
    assert first.task == "multilabel"
    record = first.split_record()
    assert record == again.split_record() and record != other.split_record()
    assert record["task"] == "multilabel" and len(record["train"]) + len(record["val"]) == 60
    train, val = first.train.counts(), first.val.counts()
    for name in first.class_names:  # each label keeps about a quarter of its positives for validation
        share = val[name] / (train[name] + val[name])
        assert 0.15 <= share <= 0.35, (name, share)


@pytest.mark.parametrize("cell, message", [
    ("top,dark", "separated by ','"),
    ("top;;dark", "empty label name"),
    ("top;", "empty label name"),
])
def test_a_bad_labels_cell_is_refused_naming_its_line(multilabel_csv: Path, cell: str, message: str) -> None:
    rows = _rows(multilabel_csv)
    rows[5][1] = cell
    bad = _write(multilabel_csv.parent / "bad.csv", rows)
    with pytest.raises(DataError, match=rf"bad.csv, line 6: .*{message}"):
        load_task_dataset(bad)


def test_two_separators_in_one_file_and_a_missing_file_are_refused_naming_the_line(multilabel_csv: Path) -> None:
    rows = _rows(multilabel_csv)
    rows[2][1], rows[7][1] = "top;dark", "footwear|dark"
    with pytest.raises(DataError, match=r"mixed.csv, line 8: separates labels with '\|' while line 3 uses ';'"):
        load_task_dataset(_write(multilabel_csv.parent / "mixed.csv", rows))
    rows = _rows(multilabel_csv)
    rows[4][0] = "coat/nowhere.png"
    with pytest.raises(DataError, match=r"missing.csv, line 5: coat/nowhere.png: no such file"):
        load_task_dataset(_write(multilabel_csv.parent / "missing.csv", rows))


def test_the_task_option_checks_the_data(multilabel_csv: Path, fashion_folder: Path) -> None:
    with pytest.raises(ConfigError, match="--task classification: .* use --task multilabel"):
        load_task_dataset(multilabel_csv, task="classification")
    with pytest.raises(ConfigError, match="--task multilabel: .* is not a multi-label CSV"):
        load_task_dataset(fashion_folder, task="multilabel")
    assert load_task_dataset(fashion_folder).task == "classification"


# --- thresholds -------------------------------------------------------------------------------------


def test_thresholds_maximise_each_labels_f1() -> None:
    scores = np.array([[0.9, 0.2], [0.7, 0.6], [0.4, 0.3], [0.1, 0.8]])
    truth = np.array([[1, 0], [1, 1], [0, 0], [0, 1]])
    first, second = choose_thresholds(scores, truth)
    assert 0.4 < first <= 0.7 and 0.3 < second <= 0.6  # every positive kept, every negative out


# --- training, bundle, predict ------------------------------------------------------------------------


def test_a_multilabel_run_measures_map_and_stores_its_thresholds(multilabel_run) -> None:
    metrics = json.loads((multilabel_run.run_dir / "metrics.json").read_text())
    assert metrics["task"] == "multilabel"
    assert metrics["map"] > 0.7  # footwear and top are easy; "dark" is the hard one
    assert {"micro_f1", "macro_f1", "per_class"} <= set(metrics)
    assert set(metrics["per_class"]["footwear"]) == {"precision", "recall", "f1", "ap", "support", "threshold"}
    meta = json.loads((multilabel_run.bundle_dir / "graft.json").read_text())
    assert meta["task"] == "multilabel"
    assert meta["thresholds"] == [metrics["per_class"][n]["threshold"] for n in meta["class_names"]]
    history = [json.loads(line) for line in (multilabel_run.run_dir / "history.jsonl").read_text().splitlines()]
    assert max(r["val_accuracy"] for r in history) == pytest.approx(metrics["map"], abs=1e-5)  # best epoch by mAP
    split = json.loads((multilabel_run.run_dir / "split.json").read_text())
    assert split["task"] == "multilabel"


def test_a_multilabel_bundle_round_trips_and_applies_its_thresholds(multilabel_run, multilabel_csv: Path) -> None:
    bundle = load_bundle(multilabel_run.bundle_dir)
    paths = [multilabel_csv.parent / row[0] for row in _rows(multilabel_csv)[1:9]]
    predictions = bundle.predict(paths, top_k=3)
    assert all(isinstance(p, LabelSetPrediction) for p in predictions)
    again = load_bundle(multilabel_run.bundle_dir).predict(paths, top_k=3)
    assert [p.to_dict() for p in predictions] == [p.to_dict() for p in again]
    thresholds = dict(zip(bundle.class_names, bundle.thresholds))
    for prediction in predictions:
        scores = dict(prediction.top_k)
        assert {name for name, _ in prediction.labels} == {n for n, s in scores.items() if s >= thresholds[n]}
    everything = bundle.predict(paths, threshold=0.0)
    assert all(len(p.labels) == 3 for p in everything)
    with pytest.raises(ConfigError, match="^threshold: expected a score between 0 and 1"):
        bundle.predict(paths, threshold=1.5)


def test_a_multilabel_bundle_without_thresholds_is_refused(multilabel_run, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(multilabel_run.bundle_dir, copy)
    meta = json.loads((copy / "graft.json").read_text())
    del meta["thresholds"]
    (copy / "graft.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="thresholds"):
        load_bundle(copy)


def test_evaluate_scores_a_multilabel_csv_like_the_run(multilabel_run, multilabel_csv: Path) -> None:
    metrics = graft.evaluate(multilabel_run.bundle_dir, multilabel_csv)
    assert metrics["task"] == "multilabel" and metrics["num_images"] == 60
    assert 0 <= metrics["map"] <= 1 and metrics["per_class"]["top"]["support"] == 24


@pytest.mark.parametrize("strategy, options", [
    ("feature-extract", {"head_solver": "lbfgs", "class_weighting": "balanced"}),
    ("feature-extract", {"multilabel_loss": "asymmetric"}),
    ("partial", {}), ("full", {}), ("discriminative", {}), ("gradual", {}), ("lp-ft", {}), ("lora", {}), ("auto", {}),
], ids=lambda value: "-".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else value)
def test_every_strategy_trains_two_epochs_on_label_sets(strategy: str, options: dict, multilabel_csv: Path, tmp_path: Path) -> None:
    run = graft.train(multilabel_csv, out=tmp_path / "run", strategy=strategy, epochs=2, verbose=False, batch_size=16, **options)
    assert run.metrics["task"] == "multilabel"
    assert 0 <= run.metrics["map"] <= 1
    bundle = load_bundle(run.bundle_dir)
    assert bundle.task == "multilabel" and len(bundle.thresholds) == 3
    logits = bundle.logits([])
    assert logits.shape == (0, 3) and torch.is_tensor(logits)


def test_a_label_set_head_by_lbfgs_keeps_the_l2_strength_that_scores_best_on_validation(multilabel_csv: Path, tmp_path: Path) -> None:
    from graft.training.multilabel import MULTILABEL

    run = graft.train(multilabel_csv, out=tmp_path / "run", strategy="feature-extract", head_solver="lbfgs", verbose=False)
    chose = run.metrics["head_l2"]
    assert list(chose["validation"]) == [f"{c:g}" for c in MULTILABEL.l2_strengths]
    assert len(set(chose["validation"].values())) > 1  # the strengths gave different heads: the choice is real
    assert chose["validation"][f"{chose['l2_c']:g}"] == max(chose["validation"].values())
    # The bundle's head is the one fitted at that strength: its validation mAP is the run's.
    assert run.metrics["map"] == pytest.approx(chose["validation"][f"{chose['l2_c']:g}"], abs=1e-4)


def _graft_cli(*args, check: bool = True):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "graft.cli.main", *map(str, args)], capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"graft {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr}")
    return result


def test_predict_and_evaluate_print_label_sets_through_the_cli(multilabel_run, multilabel_csv: Path, trained_run) -> None:
    import io

    folder = multilabel_csv.parent / "sneaker"
    rows = [json.loads(line) for line in _graft_cli("predict", multilabel_run.bundle_dir, folder, "-f", "json").stdout.splitlines()]
    assert len(rows) == 6 and set(rows[0]) == {"path", "labels", "top_k"}
    table = list(csv.DictReader(io.StringIO(_graft_cli("predict", multilabel_run.run_dir, folder, "-f", "csv", "--threshold", "0").stdout)))
    assert all(set(row["labels"].split(";")) == {"dark", "footwear", "top"} for row in table)
    assert "footwear" in _graft_cli("predict", multilabel_run.bundle_dir, folder).stdout
    metrics = json.loads(_graft_cli("evaluate", multilabel_run.bundle_dir, multilabel_csv, "--json").stdout)
    assert metrics["task"] == "multilabel" and "map" in metrics and "ap" in metrics["per_class"]["dark"]
    refused = _graft_cli("predict", trained_run.bundle_dir, folder, "--threshold", "0.3", check=False)
    assert refused.returncode == 2 and "--threshold" in refused.stderr and "single-label" in refused.stderr


def test_evaluate_refuses_labels_of_the_other_kind(multilabel_run, multilabel_csv: Path, trained_run, holdout_folder: Path) -> None:
    with pytest.raises(DataError, match="multi-label CSV .* but the bundle is single-label"):
        graft.evaluate(trained_run.bundle_dir, multilabel_csv)
    with pytest.raises(DataError, match="one label per image, but the bundle is multi-label"):
        graft.evaluate(multilabel_run.bundle_dir, holdout_folder)
