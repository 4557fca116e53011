"""Finding, checking and splitting labelled images."""

import shutil

import pytest

from graft.errors import ConfigError, DataError
from graft.input.data import load_dataset


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

    from graft.input.sample_data import FASHION_MNIST_DIR

    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).symlink_to(FASHION_MNIST_DIR / name)
    code = "from graft.input.sample_data import load_fashion_mnist as f; s = f('test'); print(len(s.labels), s.images.shape)"
    env = {**os.environ, "GRAFT_FASHION_MNIST_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split()[0] == "10000"
    code = "from graft.input.sample_data import load_fashion_mnist as f; f('train')"
    failed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert failed.returncode != 0
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in failed.stderr
    assert "dataset-fashion-mnist" in failed.stderr and "GRAFT_FASHION_MNIST_DIR" in failed.stderr


# --- layouts that must not train the wrong classifier -------------------------------------------


def _copy_classes(source, target, per_class=None):
    for class_dir in sorted(d for d in source.iterdir() if d.is_dir()):
        (target / class_dir.name).mkdir(parents=True)
        for path in sorted(class_dir.glob("*.png"))[:per_class]:
            shutil.copy(path, target / class_dir.name / path.name)


def test_split_folders_are_recognised_in_any_case_and_test_is_held_out(fashion_folder, holdout_folder, tmp_path):
    root = tmp_path / "cased"
    _copy_classes(fashion_folder, root / "Train")
    _copy_classes(holdout_folder, root / "Validation", per_class=2)
    _copy_classes(holdout_folder, root / "TEST", per_class=3)
    dataset = load_dataset(root)
    assert dataset.split == "folders" and dataset.class_names == ["bag", "sneaker", "trouser"]
    assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (36, 6, 9)
    assert dataset.split_record()["test"][0] == ["TEST/bag/" + sorted((root / "TEST" / "bag").iterdir())[0].name, "bag"]
    assert dataset.summary()["num_test"] == 9
    shutil.copytree(root / "Validation", root / "val")
    with pytest.raises(DataError, match=r"Validation/ and val/ are both valid folders; keep one"):
        load_dataset(root)


def test_train_alone_or_with_test_is_split_from_train_with_a_seed(fashion_folder, holdout_folder, tmp_path):
    alone = tmp_path / "alone"
    _copy_classes(fashion_folder, alone / "train")
    dataset = load_dataset(alone, seed=1)
    assert dataset.split == "seeded" and dataset.test is None
    assert (len(dataset.train), len(dataset.val)) == (30, 6)
    assert any("no validation folder" in w and "seed 1" in w for w in dataset.warnings)

    with_test = tmp_path / "with-test"
    _copy_classes(fashion_folder, with_test / "training")
    _copy_classes(holdout_folder, with_test / "testing", per_class=2)
    dataset = load_dataset(with_test, seed=1)
    assert dataset.split == "seeded" and dataset.class_names == ["bag", "sneaker", "trouser"]
    assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (30, 6, 6)
    assert not set(dataset.test.paths) & set(dataset.train.paths + dataset.val.paths)


def test_a_split_folder_without_train_or_a_class_named_like_a_split_is_said(fashion_folder, tmp_path):
    root = tmp_path / "val-class"
    _copy_classes(fashion_folder, root, per_class=3)
    shutil.copytree(root / "bag", root / "val")
    with pytest.raises(DataError, match=r"val/ but no training folder.*rename it"):
        load_dataset(root)

    nested = tmp_path / "nested"
    _copy_classes(fashion_folder, nested / "train", per_class=4)
    _copy_classes(fashion_folder, nested / "train" / "Valid", per_class=2)  # one level too deep
    dataset = load_dataset(nested)
    assert dataset.class_names == ["Valid", "bag", "sneaker", "trouser"]
    assert any("'Valid' has a split folder's name" in w for w in dataset.warnings)


def test_a_csv_counts_each_image_once_and_refuses_two_labels(fashion_folder, tmp_path):
    images = sorted(fashion_folder.rglob("*.png"))
    rows = [f"{p},{p.parent.name}" for p in images]
    repeated = tmp_path / "repeated.csv"
    repeated.write_text("\n".join(["path,label", *rows, *rows[:5]]))
    dataset = load_dataset(repeated)
    assert len(dataset.train) + len(dataset.val) == 36
    assert not set(dataset.train.paths) & set(dataset.val.paths)
    assert any("5 repeated row(s) ignored" in w and "line 38 repeats line 2" in w for w in dataset.warnings)

    conflicting = tmp_path / "conflicting.csv"
    relabelled = f"{images[0].parent}/../{images[0].parent.name}/{images[0].name},trouser"  # the same file
    conflicting.write_text("\n".join(["path,label", *rows, relabelled]))
    with pytest.raises(DataError, match=r"line 38 labels .* 'trouser', line 2 'bag'"):
        load_dataset(conflicting)


def test_symlinks_never_count_a_file_twice_nor_leave_the_data_folder(fashion_folder, tmp_path):
    root = tmp_path / "links"
    _copy_classes(fashion_folder, root)
    outside = tmp_path / "elsewhere"
    _copy_classes(fashion_folder, outside, per_class=2)
    (root / "bag" / "up").symlink_to(root, target_is_directory=True)  # a loop through the data root
    (root / "bag" / "more").symlink_to(outside / "sneaker", target_is_directory=True)
    (root / "bag" / "same.png").symlink_to(sorted((root / "bag").glob("*.png"))[0])
    dataset = load_dataset(root)
    assert dataset.train.counts()["bag"] + dataset.val.counts()["bag"] == 12
    assert len(dataset.train) + len(dataset.val) == 36
    assert any(f"{root / 'bag' / 'up'}: a symbolic link" in w and "loop" in w for w in dataset.warnings)
    assert any("lead outside the data folder" in w and f"{root / 'bag' / 'more'} -> {outside / 'sneaker'}" in w for w in dataset.warnings)

    (root / "trouser" / "stolen.png").symlink_to(sorted((root / "bag").glob("*.png"))[1])
    with pytest.raises(DataError, match=r"under two classes.*\(class bag\) and .*stolen.png \(class trouser\)"):
        load_dataset(root)


def test_identical_files_under_two_classes_or_both_sides_are_warned(fashion_folder, tmp_path):
    root = tmp_path / "copies"
    _copy_classes(fashion_folder, root / "train")
    _copy_classes(fashion_folder, root / "valid", per_class=2)
    first_bag = sorted((root / "train" / "bag").glob("*.png"))[0]
    shutil.copy(first_bag, root / "train" / "trouser" / "bag-copy.png")
    dataset = load_dataset(root)
    two_labels = [w for w in dataset.warnings if "labelled with two classes" in w]
    assert two_labels and f"train/bag/{first_bag.name} = train/trouser/bag-copy.png (bag, trouser)" in two_labels[0]
    assert any(w.startswith("6 validation image(s) identical to training images") for w in dataset.warnings)


def test_a_fifo_named_like_an_image_is_skipped_or_refused_without_opening_it(fashion_folder, tmp_path):
    import os
    import threading

    from graft.api import expand_image_paths
    from graft.errors import ImageError
    from graft.input.images import load_image

    root = tmp_path / "fifo"
    _copy_classes(fashion_folder, root, per_class=4)
    fifo = root / "bag" / "pipe.png"
    os.mkfifo(fifo)
    opened = []

    def writer():  # unblocks a reader that opens the FIFO, so a failing check fails instead of hanging
        with open(fifo, "wb") as pipe:
            opened.append(True)
            pipe.write(b"not an image")

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        dataset = load_dataset(root, on_bad_image="skip")
        assert not dataset.bad_images and len(dataset.train) + len(dataset.val) == 12
        assert any(f"{fifo}: not a regular file" in w for w in dataset.warnings)
        assert fifo in list(expand_image_paths([root]))  # predict names it as a failed file
        with pytest.raises(ImageError, match="not a regular file"):
            load_image(fifo)
        opened_by_graft = list(opened)
    finally:
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # lets a still-waiting writer finish
        thread.join()
        os.close(reader)
    assert not opened_by_graft


def test_train_measures_the_final_model_on_the_held_out_test_folder(fashion_folder, holdout_folder, tmp_path):
    import json

    import graft

    root = tmp_path / "data"
    _copy_classes(fashion_folder, root / "train")
    _copy_classes(holdout_folder, root / "test", per_class=3)
    run = graft.train(root, strategy="feature-extract", out=tmp_path / "run", epochs=5, verbose=False)
    test = json.loads((run.run_dir / "metrics.json").read_text())["test"]
    assert test["num_images"] == 9 and test["class_names"] == ["bag", "sneaker", "trouser"]
    assert test["accuracy"] == graft.evaluate(run.bundle_dir, root / "test")["accuracy"]
    assert len(json.loads((run.run_dir / "split.json").read_text())["test"]) == 9
    with pytest.raises(DataError, match=r"split folders \(test/, train/\).*give the split to evaluate on"):
        graft.evaluate(run.bundle_dir, root)


@pytest.mark.slow
def test_a_run_decodes_each_photo_once_at_the_models_size_and_a_rerun_none(tmp_path, monkeypatch):
    """The image check is the run's first decode (kept for extraction); an unchanged folder is not
    re-read. The report decodes one validation image more, for its feature maps."""
    import graft
    from PIL import ImageFile

    from graft.input.sample_data import write_photos

    photos = write_photos(tmp_path / "data", 3, names=("coffee", "chelsea"))  # 4032x3024 JPEGs
    decoded: list[tuple[int, int]] = []
    load = ImageFile.ImageFile.load

    def counted(image):
        if image.tile:  # pixels still to decode (a loaded picture has none)
            decoded.append(image.size)
        return load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counted)
    options = dict(strategy="feature-extract", epochs=3, precision="fp32", cache_dir=str(tmp_path / "cache"), verbose=False)
    graft.train(tmp_path / "data", out=tmp_path / "first", **options)
    # The data check after training (graft.input.check) decodes each photo once more, at 1/8 scale,
    # for its perceptual hash; the check before training and the extraction share one decode.
    thumbnails = [size for size in decoded if max(size) <= 4032 // 8]
    assert len(thumbnails) == len(photos) and len(decoded) - len(thumbnails) == len(photos) + 1
    assert all(max(size) <= 4032 // 4 for size in decoded)  # DCT-scaled, not 12 MP
    decoded.clear()
    graft.train(tmp_path / "data", out=tmp_path / "again", check_data=False, **options)
    assert len(decoded) == 1  # the report's feature maps: no check, no extraction


def test_listing_and_checking_show_progress_file_by_file(fashion_folder):
    import contextlib

    bars: list[list] = []

    @contextlib.contextmanager
    def progress(description, total):
        bars.append([description, total, 0])
        yield lambda n=1, status=None: bars[-1].__setitem__(2, bars[-1][2] + n)

    load_dataset(fashion_folder, progress=progress)
    # Listing has no total yet, but counts each file as it is found; checking counts against the total.
    assert bars == [["listing images", None, 36], ["checking images", 36, 36]]


def test_unchanged_files_are_trusted_changed_ones_checked_again(fashion_folder, tmp_path):
    from graft.input.data import CheckedFiles
    from graft.input.images import load_image

    root = tmp_path / "data"
    shutil.copytree(fashion_folder, root)
    decoded: list[str] = []

    def decode(data, name, digest):
        decoded.append(name)
        load_image(data, name=name)

    first = load_dataset(root, decode=decode, checked=CheckedFiles(tmp_path / "cache"))
    assert len(decoded) == 36
    decoded.clear()
    again = load_dataset(root, decode=decode, checked=CheckedFiles(tmp_path / "cache"))
    assert decoded == [] and again.train.digests == first.train.digests
    damaged = sorted((root / "bag").iterdir())[0]
    damaged.write_bytes(damaged.read_bytes()[:40])  # truncated: size and mtime change
    with pytest.raises(DataError, match=damaged.name):
        load_dataset(root, decode=decode, checked=CheckedFiles(tmp_path / "cache"))
    assert decoded == [str(damaged)]
