"""Labelled images in: an image folder or a CSV, checked image by image, split train/validation.

`load_dataset` is the entry point. A folder has one sub-folder per class; if it has `train/` and
`valid/` (or `val/`) sub-folders, they are the split, otherwise a stratified split is drawn with a
seed and recorded. A CSV has `path,label` columns, paths relative to the CSV.
Every image is decoded once before training; unreadable ones are listed with the reason.
"""

from __future__ import annotations

import csv
import hashlib
import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

from graft.errors import ConfigError, DataError, ImageError
from graft.images import is_image_name, load_image

OnBadImage = Literal["error", "skip"]
IGNORED_DIR_NAMES = frozenset({"__MACOSX", "__pycache__"})
SPLIT_DIR_NAMES = ("train", "valid", "val")


@dataclass(frozen=True)
class BadImage:
    path: str
    reason: str


@dataclass
class LabelledImages:
    """Image paths with integer labels into `class_names`, plus each file's content digest."""

    paths: list[Path]
    labels: list[int]
    class_names: list[str]
    digests: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def counts(self) -> dict[str, int]:
        counter = Counter(self.labels)
        return {name: counter.get(i, 0) for i, name in enumerate(self.class_names)}

    def images_per_class(self) -> float:
        """The median number of images over the classes that have any (0 when there are none)."""
        import statistics

        present = [n for n in self.counts().values() if n]
        return float(statistics.median(present)) if present else 0.0


@dataclass
class Dataset:
    """The checked, split data of a run."""

    root: Path
    class_names: list[str]
    train: LabelledImages
    val: LabelledImages
    split: str  # "folders" (train/ and valid/ given), "seeded" (drawn by graft) or "csv"
    seed: int
    val_fraction: float
    bad_images: list[BadImage] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        train_counts = self.train.counts()
        sizes = [c for c in train_counts.values() if c]
        return {
            "root": str(self.root),
            "class_names": self.class_names,
            "num_classes": len(self.class_names),
            "num_train": len(self.train),
            "num_val": len(self.val),
            "train_per_class": train_counts,
            "val_per_class": self.val.counts(),
            "imbalance_ratio": (max(sizes) / min(sizes)) if sizes else None,
            "split": self.split,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "bad_images": [{"path": b.path, "reason": b.reason} for b in self.bad_images],
            "warnings": self.warnings,
        }

    def split_record(self) -> dict[str, object]:
        """Which file went where, relative to the data root: enough to repeat the split."""

        def rel(paths: Iterable[Path]) -> list[str]:
            return [relative_path(p, self.root) for p in paths]

        return {
            "split": self.split,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "class_names": self.class_names,
            "train": [[p, self.class_names[y]] for p, y in zip(rel(self.train.paths), self.train.labels)],
            "val": [[p, self.class_names[y]] for p, y in zip(rel(self.val.paths), self.val.labels)],
        }


def load_dataset(
    source: str | Path,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    on_bad_image: OnBadImage = "error",
    workers: int | None = None,
) -> Dataset:
    """Find, check and split the labelled images under `source` (a folder or a CSV file)."""
    if on_bad_image not in ("error", "skip"):
        raise ConfigError(f"--on-bad-image: expected 'error' or 'skip', got {on_bad_image!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"--val-fraction: expected a number between 0 and 1, got {val_fraction}")
    root = Path(source)
    warnings: list[str] = []
    if root.is_file() and root.suffix.lower() == ".csv":
        class_names, items = read_csv_labels(root)
        train_items, val_items = _seeded_split(items, val_fraction, seed, warnings)
        split = "csv"
        base = root.parent
    elif root.is_dir():
        base = root
        split_dirs = _split_dirs(root)
        if split_dirs is not None:
            train_dir, val_dir = split_dirs
            train_names, train_found = scan_class_folders(train_dir, warnings)
            val_names, val_found = scan_class_folders(val_dir, warnings)
            extra = sorted(set(val_names) - set(train_names))
            if extra:
                raise DataError(
                    f"{val_dir}: classes {extra} have validation images but no folder in "
                    f"{train_dir}; every class needs training images"
                )
            class_names = train_names
            index = {name: i for i, name in enumerate(class_names)}
            train_items = [(p, index[c]) for p, c in train_found]
            val_items = [(p, index[c]) for p, c in val_found]
            split = "folders"
        else:
            class_names, found = scan_class_folders(root, warnings)
            index = {name: i for i, name in enumerate(class_names)}
            items = [(p, index[c]) for p, c in found]
            train_items, val_items = _seeded_split(items, val_fraction, seed, warnings)
            split = "seeded"
    elif root.exists():
        raise DataError(f"{root}: expected a folder of class sub-folders or a .csv file with path,label columns")
    else:
        raise DataError(f"{root}: no such folder or file; give the folder that holds one sub-folder per class")

    if len(class_names) < 2:
        raise DataError(
            f"{root}: found {len(class_names)} class ({', '.join(class_names) or 'none'}); "
            "a classifier needs at least 2 classes, each in its own sub-folder with images"
        )
    all_paths = [p for p, _ in train_items] + [p for p, _ in val_items]
    digests, bad = verify_images(all_paths, workers=workers)
    if bad and on_bad_image == "error":
        listing = "\n".join(f"  {b.path}: {b.reason}" for b in bad[:50])
        more = f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
        raise DataError(
            f"{len(bad)} of {len(all_paths)} images in {root} cannot be used:\n{listing}{more}\n"
            "Fix or remove them, or pass --on-bad-image skip to train without them."
        )
    if bad:
        warnings.append(f"skipped {len(bad)} unreadable image(s) (listed in the data summary)")
    train = _labelled([(p, y) for p, y in train_items if p in digests], class_names, digests)
    val = _labelled([(p, y) for p, y in val_items if p in digests], class_names, digests)
    _check_usable(root, train, val, warnings)
    return Dataset(
        root=base, class_names=class_names, train=train, val=val, split=split, seed=seed,
        val_fraction=val_fraction, bad_images=bad, warnings=warnings,
    )


def load_labelled_folder(source: str | Path, *, on_bad_image: OnBadImage = "error") -> tuple[LabelledImages, list[BadImage]]:
    """A labelled folder (one sub-folder per class, or a CSV) as one set, for evaluation."""
    root = Path(source)
    warnings: list[str] = []
    if root.is_file() and root.suffix.lower() == ".csv":
        class_names, items = read_csv_labels(root)
    elif root.is_dir():
        class_names, found = scan_class_folders(root, warnings)
        index = {name: i for i, name in enumerate(class_names)}
        items = [(p, index[c]) for p, c in found]
    else:
        raise DataError(f"{root}: no such folder or CSV file; give a folder with one sub-folder per class")
    if not items:
        raise DataError(f"{root}: no images found in class sub-folders")
    digests, bad = verify_images([p for p, _ in items])
    if bad and on_bad_image == "error":
        listing = "\n".join(f"  {b.path}: {b.reason}" for b in bad[:50])
        raise DataError(f"{len(bad)} images in {root} cannot be used:\n{listing}\nFix or remove them, or pass --on-bad-image skip.")
    return _labelled([(p, y) for p, y in items if p in digests], class_names, digests), bad


def scan_class_folders(root: Path, warnings: list[str]) -> tuple[list[str], list[tuple[Path, str]]]:
    """(class names in sorted order, [(image path, class name)]) under one sub-folder per class."""
    class_dirs = sorted(
        d for d in root.iterdir()
        if d.is_dir() and not _ignored_name(d.name) and d.name not in SPLIT_DIR_NAMES
    ) if root.is_dir() else []
    loose = [p for p in root.iterdir() if p.is_file() and is_image_name(p) and not _ignored_name(p.name)]
    if not class_dirs:
        hint = " (the images lie directly in it)" if loose else ""
        raise DataError(
            f"{root}: no class sub-folders found{hint}; put each class's images in its own "
            f"sub-folder, e.g. {root}/cat/1.jpg and {root}/dog/2.jpg"
        )
    if loose:
        warnings.append(f"{root}: {len(loose)} image(s) directly in the folder were ignored (not in a class folder)")
    names: list[str] = []
    found: list[tuple[Path, str]] = []
    for class_dir in class_dirs:
        images = sorted(walk_images(class_dir))
        if not images:
            warnings.append(f"{class_dir}: empty class folder (no images) skipped")
            continue
        names.append(class_dir.name)
        found.extend((p, class_dir.name) for p in images)
    return names, found


def read_csv_labels(csv_path: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Read a `path,label` CSV (paths relative to the CSV's folder)."""
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fields = [f.strip().lower() for f in reader.fieldnames or []]
            if "path" not in fields or "label" not in fields:
                raise DataError(
                    f"{csv_path}: expected a header with 'path' and 'label' columns, found {reader.fieldnames}"
                )
            rows = [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    except UnicodeDecodeError:
        raise DataError(f"{csv_path}: not a UTF-8 text CSV file") from None
    pairs: list[tuple[Path, str]] = []
    for line, row in enumerate(rows, start=2):
        if not row.get("path") or not row.get("label"):
            raise DataError(f"{csv_path}, line {line}: empty path or label; every row needs both")
        path = Path(row["path"])
        pairs.append((path if path.is_absolute() else csv_path.parent / path, row["label"]))
    class_names = sorted({label for _, label in pairs})
    index = {name: i for i, name in enumerate(class_names)}
    return class_names, [(p, index[label]) for p, label in pairs]


def verify_images(paths: list[Path], *, workers: int | None = None) -> tuple[dict[Path, str], list[BadImage]]:
    """Decode every image once; returns ({path: content digest} for good ones, [bad ones])."""
    workers = workers or min(8, (os.cpu_count() or 1) * 2)

    def check(path: Path) -> tuple[Path, str | None, str | None]:
        try:
            data = path.read_bytes()
        except OSError as exc:
            return path, None, f"cannot be read ({exc.strerror or exc})"
        try:
            load_image(data, name=str(path))
        except ImageError as exc:
            return path, None, exc.reason
        return path, file_digest(data), None

    digests: dict[Path, str] = {}
    bad: list[BadImage] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for path, digest, reason in pool.map(check, paths):
            if digest is None:
                bad.append(BadImage(str(path), reason or "unreadable"))
            else:
                digests[path] = digest
    return digests, bad


def file_digest(data: bytes) -> str:
    """The content key of an image file (its bytes, not its name)."""
    return hashlib.sha256(data).hexdigest()[:32]


# --- helpers --------------------------------------------------------------------------------------


def _split_dirs(root: Path) -> tuple[Path, Path] | None:
    train = root / "train"
    val = next((root / n for n in ("valid", "val") if (root / n).is_dir()), None)
    if train.is_dir() and val is not None:
        return train, val
    return None


def _ignored_name(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_DIR_NAMES


def walk_images(folder: Path) -> Iterable[Path]:
    # Follows symlinked folders once each (a symlink loop is visited only once).
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not _ignored_name(d))
        for filename in sorted(filenames):
            path = Path(dirpath) / filename
            if not _ignored_name(filename) and is_image_name(path):
                yield path


def _seeded_split(
    items: list[tuple[Path, int]], val_fraction: float, seed: int, warnings: list[str]
) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """Stratified: each class keeps round(n * val_fraction) (at least 1 when it has 2+) for validation."""
    by_class: dict[int, list[tuple[Path, int]]] = {}
    for item in sorted(items, key=lambda pair: (pair[1], str(pair[0]))):
        by_class.setdefault(item[1], []).append(item)
    rng = random.Random(seed)
    train: list[tuple[Path, int]] = []
    val: list[tuple[Path, int]] = []
    for label in sorted(by_class):
        members = by_class[label][:]
        rng.shuffle(members)
        n_val = max(1, round(len(members) * val_fraction)) if len(members) >= 2 else 0
        if len(members) < 2:
            warnings.append(
                f"class #{label} has a single image: it is used for training only and cannot be validated"
            )
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    return train, val


def _labelled(items: list[tuple[Path, int]], class_names: list[str], digests: dict[Path, str]) -> LabelledImages:
    return LabelledImages(
        paths=[p for p, _ in items],
        labels=[y for _, y in items],
        class_names=class_names,
        digests=[digests[p] for p, _ in items],
    )


def _check_usable(root: Path, train: LabelledImages, val: LabelledImages, warnings: list[str]) -> None:
    counts = train.counts()
    missing = [name for name, n in counts.items() if n == 0]
    if missing:
        raise DataError(f"{root}: classes {missing} have no usable training image; add images or remove the class")
    if len(val) == 0:
        raise DataError(
            f"{root}: no validation images; give each class at least 2 images, or a valid/ folder"
        )
    sizes = list(counts.values())
    if max(sizes) >= 10 * min(sizes):
        warnings.append(
            f"classes are imbalanced ({max(sizes)}:{min(sizes)} training images); "
            "consider --class-weighting balanced"
        )


def relative_path(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
