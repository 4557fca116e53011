"""Finding, checking and splitting labelled images."""

import shutil

import pytest

from graft.data import load_dataset
from graft.errors import ConfigError, DataError


def test_seeded_split_is_stratified_and_reproducible(fashion_folder):
    first = load_dataset(fashion_folder, seed=3)
    again = load_dataset(fashion_folder, seed=3)
    other = load_dataset(fashion_folder, seed=4)
    assert first.split == "seeded"
    assert first.train.paths == again.train.paths and first.val.paths == again.val.paths
    assert first.val.paths != other.val.paths
    assert set(first.val.counts().values()) == {round(12 * 0.2)}
    assert not set(first.train.paths) & set(first.val.paths)
    record = first.split_record()
    assert len(record["train"]) == len(first.train) and record["seed"] == 3


def test_train_and_valid_folders_are_the_split(fashion_folder, tmp_path):
    root = tmp_path / "split"
    for part in ("train", "valid"):
        shutil.copytree(fashion_folder, root / part)
    dataset = load_dataset(root)
    assert dataset.split == "folders"
    assert len(dataset.train) == len(dataset.val) == 36
    assert dataset.class_names == ["bag", "sneaker", "trouser"]


def test_csv_of_path_and_label(fashion_folder, tmp_path):
    lines = ["path,label"] + [f"{p},{p.parent.name}" for p in sorted(fashion_folder.rglob("*.png"))]
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("\n".join(lines))
    dataset = load_dataset(csv_path)
    assert dataset.split == "csv" and len(dataset.train) + len(dataset.val) == 36


def test_bad_images_are_all_listed_then_skippable(fashion_folder, tmp_path):
    root = tmp_path / "messy"
    shutil.copytree(fashion_folder, root)
    (root / "bag" / "empty.png").write_bytes(b"")
    (root / "trouser" / "note.jpg").write_text("hello")
    with pytest.raises(DataError) as error:
        load_dataset(root)
    message = str(error.value)
    assert "empty.png" in message and "note.jpg" in message and "--on-bad-image skip" in message
    dataset = load_dataset(root, on_bad_image="skip")
    assert len(dataset.bad_images) == 2
    assert len(dataset.train) + len(dataset.val) == 36


def test_hidden_files_and_macosx_are_ignored(fashion_folder, tmp_path):
    root = tmp_path / "mac"
    shutil.copytree(fashion_folder, root)
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "._x.png").write_bytes(b"junk")
    (root / "bag" / ".DS_Store").write_bytes(b"junk")
    (root / "bag" / "._1.png").write_bytes(b"junk")
    dataset = load_dataset(root)
    assert dataset.class_names == ["bag", "sneaker", "trouser"] and not dataset.bad_images


def test_a_single_class_is_refused(fashion_folder, tmp_path):
    root = tmp_path / "one"
    shutil.copytree(fashion_folder / "bag", root / "bag")
    with pytest.raises(DataError, match="at least 2 classes"):
        load_dataset(root)


def test_images_without_class_folders_are_explained(fashion_folder, tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for path in list((fashion_folder / "bag").glob("*.png"))[:3]:
        shutil.copy(path, root / path.name)
    with pytest.raises(DataError, match="sub-folder"):
        load_dataset(root)


def test_missing_folder_and_bad_options():
    with pytest.raises(DataError, match="no such folder"):
        load_dataset("/nonexistent/photos")
    with pytest.raises(ConfigError, match="--on-bad-image"):
        load_dataset(".", on_bad_image="ignore")  # type: ignore[arg-type]


def test_fashion_mnist_can_come_from_another_folder(tmp_path):
    """GRAFT_FASHION_MNIST_DIR: the same .gz files elsewhere (no Debian package); a folder without
    them gives an error that names the file and both ways to fix it."""
    import os
    import subprocess
    import sys

    from graft.sample_data import FASHION_MNIST_DIR

    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).symlink_to(FASHION_MNIST_DIR / name)
    code = "from graft.sample_data import load_fashion_mnist as f; s = f('test'); print(len(s.labels), s.images.shape)"
    env = {**os.environ, "GRAFT_FASHION_MNIST_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split()[0] == "10000"
    code = "from graft.sample_data import load_fashion_mnist as f; f('train')"
    failed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert failed.returncode != 0
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in failed.stderr
    assert "dataset-fashion-mnist" in failed.stderr and "GRAFT_FASHION_MNIST_DIR" in failed.stderr
