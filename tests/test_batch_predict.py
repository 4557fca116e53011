"""`graft predict BUNDLE DIR --out predictions.csv`: streamed, whole lines, resumable."""

from __future__ import annotations

import csv
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from graft.errors import ConfigError
from graft.shipping.batch_predict import CSV_COLUMNS, predict_to_csv, read_predictions
from graft.shipping.bundle import load_bundle


@pytest.fixture(scope="module")
def bundle(trained_run):
    return load_bundle(trained_run.bundle_dir)


@pytest.fixture()
def images(holdout_folder, tmp_path) -> Path:
    """The 18 real holdout PNGs and one truncated JPEG, in a folder of their own."""
    folder = tmp_path / "images"
    shutil.copytree(holdout_folder, folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


def _paths(rows: list[dict[str, str]]) -> list[str]:
    return [row["path"] for row in rows]


def test_writes_every_image_once_and_resumes_without_repeating(bundle, images, tmp_path):
    out = tmp_path / "predictions.csv"
    first = predict_to_csv(bundle, [images], out, top_k=2, batch_size=5)
    assert (first.total, first.skipped, first.written, len(first.failed)) == (19, 0, 18, 1)
    rows = read_predictions(out)
    assert len(rows) == 19 and len(set(_paths(rows))) == 19
    assert out.read_text().splitlines()[0] == ",".join(CSV_COLUMNS)

    by_path = {row["path"]: row for row in rows}
    broken = by_path.pop(str(images / "broken.jpg"))
    assert broken["label"] == "" and "truncated" in broken["error"]
    expected = {p.path: p for p in bundle.predict(sorted(images.rglob("*.png")), top_k=2)}
    assert set(by_path) == set(expected)
    for path, row in by_path.items():
        assert row["label"] == expected[path].label and abs(float(row["score"]) - expected[path].score) < 1e-5
        assert row["top_k"].split(";")[0].startswith(expected[path].top_k[0][0] + ":") and row["error"] == ""

    before = out.read_bytes()
    again = predict_to_csv(bundle, [images], out)
    assert (again.skipped, again.written, len(again.failed)) == (19, 0, 0)
    assert out.read_bytes() == before

    (images / "bag" / "new.png").write_bytes((images / "bag").glob("*.png").__next__().read_bytes())
    more = predict_to_csv(bundle, [images], out)
    assert (more.skipped, more.written) == (19, 1)
    assert len(read_predictions(out)) == 20 and out.read_bytes().startswith(before)


def test_a_trailing_partial_line_is_dropped_on_resume(bundle, images, tmp_path):
    out = tmp_path / "predictions.csv"
    predict_to_csv(bundle, [images], out)
    lines = out.read_bytes().splitlines(keepends=True)
    kept = b"".join(lines[:8])  # header + 7 whole rows
    out.write_bytes(kept + lines[8][: len(lines[8]) // 2])  # what a kill mid-write would leave
    result = predict_to_csv(bundle, [images], out)
    assert (result.skipped, result.written + len(result.failed)) == (7, 12)
    data = out.read_bytes()
    assert data.startswith(kept) and data.endswith(b"\n")
    rows = read_predictions(out)
    assert len(rows) == 19 and len(set(_paths(rows))) == 19
    assert all(set(row) == set(CSV_COLUMNS) and None not in row.values() for row in rows)


def test_refuses_a_file_that_is_not_a_predictions_csv(bundle, images, tmp_path):
    other = tmp_path / "notes.csv"
    other.write_text("name,value\na,1\n")
    with pytest.raises(ConfigError, match="not a graft predictions CSV"):
        predict_to_csv(bundle, [images], other)
    assert other.read_text() == "name,value\na,1\n"


@pytest.mark.slow
def test_cli_killed_run_resumes_to_every_image_exactly_once(trained_run, holdout_folder, tmp_path):
    """A real SIGKILL in the middle of `graft predict --out`, then the same command again."""
    folder = tmp_path / "many"
    for copy in range(12):  # 216 real images: long enough to be killed mid-way
        for png in holdout_folder.rglob("*.png"):
            target = folder / png.parent.name / f"{copy}-{png.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, target)
    out = tmp_path / "predictions.csv"
    command = [sys.executable, "-m", "graft.cli.main", "predict", str(trained_run.bundle_dir), str(folder),
               "--out", str(out), "--batch-size", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (out.exists() and out.read_bytes().count(b"\n") > 20):
        assert process.poll() is None, process.communicate()[1].decode()
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted = read_predictions(out)
    assert 20 <= len(interrupted) < 216, "the run finished before it could be killed"

    # The resumed run may batch differently: what is done is decided by the paths in the file.
    result = subprocess.run([*command[:-1], "32"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "already there" in result.stderr and "predicting" in result.stderr
    assert result.stdout == ""  # the progress bar and summary go to stderr
    rows = read_predictions(out)
    assert len(rows) == 216 and len(set(_paths(rows))) == 216
    assert _paths(rows)[: len(interrupted)] == _paths(interrupted)
    assert all(row["label"] in ("bag", "sneaker", "trouser", "unknown") for row in rows)
    assert list(csv.reader(out.open()))[0] == list(CSV_COLUMNS)


def test_out_in_missing_folders_creates_them_and_a_file_in_the_way_is_named(trained_run, holdout_folder, tmp_path, capsys):
    from graft.cli.main import main

    out = tmp_path / "missing" / "dir" / "p.csv"
    assert main(["predict", str(trained_run.bundle_dir), str(holdout_folder / "bag"), "--out", str(out)]) == 0
    assert len(read_predictions(out)) == 6
    assert f"created the folder {out.parent}" in " ".join(capsys.readouterr().err.split())
    (tmp_path / "a-file").write_text("")
    blocked = tmp_path / "a-file" / "sub" / "p.csv"
    assert main(["predict", str(trained_run.bundle_dir), str(holdout_folder / "bag"), "--out", str(blocked)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("graft: error: --out: ") and f"{tmp_path / 'a-file'} is a file, not a folder" in err
    assert len(err.strip().splitlines()) == 1
