"""Shared fixtures: real tiny image folders from Fashion-MNIST, the bundled backbone, one run."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

# Tests never write into the user's cache, and never wait on the Hub's retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _feature_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("graft-cache")
    os.environ["GRAFT_CACHE_DIR"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def fashion_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real Fashion-MNIST images: 3 classes x 12 images in class sub-folders (seeded split)."""
    from graft.input.sample_data import load_fashion_mnist, sample_per_class, write_image_folder

    source = load_fashion_mnist("test")
    keep = np.isin(source.labels, [1, 7, 8])  # trouser, sneaker, bag: far apart, learnable from few
    subset = type(source)(source.name, source.images[keep], source.labels[keep], source.class_names)
    root = tmp_path_factory.mktemp("fashion") / "data"
    write_image_folder(subset, sample_per_class(subset.labels, 12, np.random.default_rng(0)), root)
    return root


@pytest.fixture(scope="session")
def holdout_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Other real Fashion-MNIST images of the same 3 classes (from the training split)."""
    from graft.input.sample_data import load_fashion_mnist, sample_per_class, write_image_folder

    source = load_fashion_mnist("train")
    keep = np.isin(source.labels, [1, 7, 8])
    subset = type(source)(source.name, source.images[keep], source.labels[keep], source.class_names)
    root = tmp_path_factory.mktemp("holdout") / "data"
    write_image_folder(subset, sample_per_class(subset.labels, 6, np.random.default_rng(1)), root)
    return root


@pytest.fixture(scope="session")
def lite0():
    from graft.models.backbones import load_backbone

    return load_backbone("efficientnet_lite0")


@pytest.fixture(scope="session")
def trained_run(fashion_folder: Path, tmp_path_factory: pytest.TempPathFactory):
    """One feature-extract run on the small real folder, through the Python API."""
    import graft

    out = tmp_path_factory.mktemp("runs") / "small"
    return graft.train(fashion_folder, strategy="feature-extract", out=out, epochs=30, verbose=False)


@pytest.fixture(scope="session")
def calibrated_run(tmp_path_factory: pytest.TempPathFactory):
    """A feature-extract run on four look-alike real classes (T-shirt, pullover, coat, shirt), so
    that validation has mistakes and the fitted temperature is not 1."""
    import graft
    from graft.input.sample_data import load_fashion_mnist, sample_per_class, write_image_folder

    source = load_fashion_mnist("test")
    keep = np.isin(source.labels, [0, 2, 4, 6])
    subset = type(source)(source.name, source.images[keep], source.labels[keep], source.class_names)
    root = tmp_path_factory.mktemp("lookalikes") / "data"
    write_image_folder(subset, sample_per_class(subset.labels, 15, np.random.default_rng(0)), root)
    return graft.train(root, out=tmp_path_factory.mktemp("runs") / "lookalikes", epochs=30, verbose=False)


@pytest.fixture(scope="session")
def foolbox_imagenet() -> list[tuple[Path, int]]:
    """foolbox's 20 real ImageNet validation JPEGs with their label index."""
    import foolbox

    folder = Path(foolbox.__file__).parent / "data"
    files = sorted(folder.glob("imagenet_*.jpg"))
    assert len(files) == 20, f"expected foolbox's 20 ImageNet images in {folder}"
    return [(f, int(f.stem.split("_")[-1])) for f in files]


# Labels derived from Fashion-MNIST classes: what a shop would tag. Trousers and bags that are not
# dark have no label at all (every label negative).
TOPS = {"tshirt_top", "pullover", "coat", "shirt"}
FOOTWEAR = {"sandal", "sneaker", "ankle_boot"}


def _labels(class_name: str, dark: bool) -> list[str]:
    names = (["top"] if class_name in TOPS else []) + (["footwear"] if class_name in FOOTWEAR else [])
    return names + (["dark"] if dark else [])


@pytest.fixture(scope="session")
def multilabel_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 real Fashion-MNIST images (6 per class) with label sets over top, footwear and dark."""
    from graft.input.sample_data import load_fashion_mnist, sample_per_class, write_image_folder

    source = load_fashion_mnist("test")
    root = tmp_path_factory.mktemp("multilabel") / "data"
    chosen = sample_per_class(source.labels, 6, np.random.default_rng(0))
    write_image_folder(source, chosen, root)
    # "dark": the garment's mean ink (over its pixels) is below the median of the chosen images.
    ink = np.array([source.images[i][source.images[i] > 0].mean() for i in chosen])
    dark = ink < np.median(ink)
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "labels"])
        for index, is_dark in zip(chosen, dark):
            name = source.class_names[int(source.labels[index])]
            writer.writerow([f"{name}/{source.name}-{int(index):05d}.png", ";".join(_labels(name, bool(is_dark)))])
    return root / "labels.csv"


@pytest.fixture(scope="session")
def multilabel_run(multilabel_csv: Path, tmp_path_factory: pytest.TempPathFactory):
    import graft

    return graft.train(multilabel_csv, out=tmp_path_factory.mktemp("ml-runs") / "fe", epochs=40, verbose=False)
