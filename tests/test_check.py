"""`graft check` and the check inside `graft train`, on real Fashion-MNIST images (and the messy
folder of tests/test_reliability.py): flipped labels, planted leaks, bad files; the user's files untouched."""

from __future__ import annotations

import csv
import hashlib
import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import graft
from test_reliability import BAD, corpus, messy_folder  # noqa: F401  (fixtures used below)


def _fingerprint(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (links not followed) with the SHA-256 of its content."""
    found = {}
    for path in sorted(folder.rglob("*")):
        relative = str(path.relative_to(folder))
        if path.is_symlink():
            found[relative] = "link to " + str(path.readlink())
        elif path.is_file():
            found[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[relative] = "folder"
    return found


def _rows(csv_path: Path) -> list[dict[str, str]]:
    with csv_path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _photo_folder(photos: list[tuple[Path, int]], root: Path) -> list[Path]:
    """foolbox's 20 ImageNet photos as two classes, each 7 in train/ and 3 in valid/; returns train/'s files."""
    train = []
    for index, (path, _) in enumerate(photos):
        name = ("first", "second")[index % 2]
        part = "train" if index // 2 < 7 else "valid"
        (root / part / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / part / name / path.name)
        if part == "train":
            train.append(root / part / name / path.name)
    return train


def _near_copy(path: Path) -> bytes:
    """The photo cropped by 5 %, resized to 80 % and re-encoded as a JPEG of quality 70."""
    image = Image.open(path).convert("RGB")
    width, height = image.size
    cropped = image.crop((round(0.03 * width), round(0.02 * height), width - round(0.02 * width), height - round(0.03 * height)))
    buffer = io.BytesIO()
    cropped.resize((round(0.8 * cropped.width), round(0.8 * cropped.height)), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=70)
    return buffer.getvalue()


def test_planted_duplicates_across_train_and_valid_are_reported_as_leaks(foolbox_imagenet, tmp_path):
    root = tmp_path / "data"
    train = _photo_folder(foolbox_imagenet, root)
    first, second = train[0], train[3]
    exact = root / "valid" / first.parent.name / "copy.jpg"
    shutil.copy(first, exact)
    near = root / "valid" / second.parent.name / "near.jpg"
    near.write_bytes(_near_copy(second))
    result = graft.check(root, tmp_path / "check", verbose=False)
    leaks = {f.path: f.detail for f in result.findings if f.issue == "leak"}
    copy, near_name = f"valid/{first.parent.name}/copy.jpg", f"valid/{second.parent.name}/near.jpg"
    assert copy in leaks and f"train/{first.parent.name}/{first.name}" in leaks[copy], leaks
    assert near_name in leaks and f"train/{second.parent.name}/{second.name}" in leaks[near_name], leaks
    assert not [f for f in result.findings if f.issue in ("leak", "duplicate") and f.path not in (copy, near_name)], \
        "the 20 distinct photos are not taken for copies of each other"
    written = _rows(tmp_path / "check" / "data_check.csv")
    assert {r["path"] for r in written if r["issue"] == "leak"} == set(leaks)


def test_a_cropped_shrunk_jpeg_copy_of_a_fashion_mnist_image_is_a_leak_and_look_alikes_are_not(fashion_folder, tmp_path):
    """28-pixel pictures: the copy (cropped, 80 %, JPEG 70) is 21 pixels wide and its features are no
    closer to its source than other sneakers are; the aligned pixels find it, and the plain trousers
    and sneakers of the folder, alike as they are, are not taken for copies of each other."""
    root = tmp_path / "data"
    planted = {}
    for folder in sorted(fashion_folder.iterdir()):
        files = sorted(folder.glob("*.png"))
        for part, chosen in (("train", files[:9]), ("valid", files[9:])):
            (root / part / folder.name).mkdir(parents=True, exist_ok=True)
            for path in chosen:
                shutil.copy(path, root / part / folder.name / path.name)
        source = files[0]
        copy = root / "valid" / folder.name / f"copy-{source.stem}.jpg"
        copy.write_bytes(_near_copy(source))
        planted[f"valid/{folder.name}/{copy.name}"] = f"train/{folder.name}/{source.name}"
    result = graft.check(root, verbose=False)
    leaks = {f.path: f.detail for f in result.findings if f.issue == "leak"}
    for copy, source in planted.items():
        assert copy in leaks and source in leaks[copy], (copy, leaks)
    assert not [f for f in result.findings if f.issue in ("leak", "duplicate") and f.path not in planted], result.findings

def test_a_flipped_label_in_a_tiny_real_folder_is_among_the_flagged(fashion_folder, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(fashion_folder, root)
    moved = sorted((root / "trouser").glob("*.png"))[3]
    moved.rename(root / "bag" / moved.name)
    result = graft.check(root, verbose=False)
    flagged = {f.path: f for f in result.findings if f.issue == "label"}
    assert f"bag/{moved.name}" in flagged, result.findings
    assert flagged[f"bag/{moved.name}"].suggested_label == "trouser"
    assert len(flagged) <= 4, "a few flags among 36 images, not every image"


def test_check_cli_on_the_messy_folder_names_the_bad_files_and_touches_nothing(messy_folder, tmp_path):
    before = _fingerprint(messy_folder)
    out = tmp_path / "check"
    result = subprocess.run([sys.executable, "-m", "graft.cli.main", "check", str(messy_folder), "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "data check:" in result.stdout
    rows = _rows(out / "data_check.csv")
    unreadable = {Path(r["path"]).name: r["detail"] for r in rows if r["issue"] == "unreadable"}
    for name, words in BAD.items():
        assert words in unreadable.get(name, ""), (name, unreadable)
    assert any(r["issue"] == "small-image" and r["path"].endswith("one-pixel.png") for r in rows), rows
    assert _fingerprint(messy_folder) == before, "graft check changed, moved or added a file in the data folder"
    again = subprocess.run([sys.executable, "-m", "graft.cli.main", "check", str(messy_folder), "--out", str(out)],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr


def test_train_checks_the_data_and_reports_it(trained_run, fashion_folder, tmp_path):
    header = (trained_run.run_dir / "data_check.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header == "path,issue,score,suggested_label,detail"
    assert (trained_run.run_dir / "data_check.json").is_file()
    assert "data_check" in trained_run.metrics
    page = (trained_run.run_dir / "report.html").read_text(encoding="utf-8")
    assert 'id="data-check"' in page and "images checked" in page
    skipped = graft.train(fashion_folder, out=tmp_path / "run", epochs=1, check_data=False, verbose=False)
    assert not (skipped.run_dir / "data_check.csv").exists() and "data_check" not in skipped.metrics


def test_check_out_never_replaces_a_run_even_with_overwrite(fashion_folder, tmp_path):
    from graft.run_folder import claim_folder

    run = tmp_path / "run"
    claim_folder(run, kind="run", files=["metrics.json"])
    (run / "metrics.json").write_text("{}")
    with pytest.raises(graft.OutputError, match="never replaces a run"):
        graft.check(fashion_folder, run, overwrite=True, verbose=False)
    assert (run / "metrics.json").read_text() == "{}"


def test_a_label_set_csv_is_checked_for_leaks_and_rare_labels_and_not_for_wrong_labels(multilabel_csv, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(multilabel_csv.parent, root)
    with (root / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    original = rows[1]["path"]
    shutil.copy(root / original, root / "copy.png")
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "labels", "split"])
        for i, row in enumerate(rows):
            labels = row["labels"] + (";rare" if i in (2, 3) else "")
            writer.writerow([row["path"], labels.lstrip(";"), "valid" if i % 5 == 0 else ""])
        writer.writerow(["copy.png", rows[1]["labels"], "valid"])
    result = graft.check(root / "labels.csv", verbose=False)
    leaks = {f.path: f.detail for f in result.findings if f.issue == "leak"}
    assert "copy.png" in leaks and original in leaks["copy.png"], result.findings
    assert [f.path for f in result.findings if f.issue == "small-class"] == ["label: rare"]
    assert not [f for f in result.findings if f.issue == "label"] and any("label sets" in n for n in result.notes)
    # graft train runs the same check and reports it.
    run = graft.train(root / "labels.csv", out=tmp_path / "run", strategy="feature-extract", epochs=2, verbose=False)
    assert run.metrics["data_check"]["leak"] == 1 and (run.run_dir / "data_check.csv").is_file()
    page = (run.run_dir / "report.html").read_text(encoding="utf-8")
    assert 'id="data-check"' in page and "label: rare" in page
