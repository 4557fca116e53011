"""Labelled images in: an image folder or a CSV, checked image by image, split train/validation.

`load_dataset` is the entry point. A folder has one sub-folder per class. Split folders are
recognised by name, in any case: `train/` (or `training/`), `valid/` (`val/`, `validation/`,
`dev/`) and `test/` (`testing/`). With `train/` and a validation folder those are the split;
with `train/` alone a stratified split of it is drawn with a seed and recorded; `test/` is a
held-out set (`Dataset.test`) the final model is measured on. Without split folders a stratified
split of the class folders is drawn. A CSV has `path,label` columns, paths relative to the CSV.

Each file counts once, by its resolved path: a link that leads out of the data folder or back
into a folder that holds it is not followed, a file reached under two classes (or given two
labels in a CSV) is refused, and identical contents under two classes or on both sides of the
split are warned about. Every image is decoded once before training; unreadable ones are listed
with the reason.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import random
import stat
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, ContextManager, Iterator, Literal

from graft.atomic import write_text
from graft.errors import ConfigError, DataError, ImageError, OutputError
from graft.input.images import is_image_name, load_image, read_image_file

OnBadImage = Literal["error", "skip"]
# Decodes one file's bytes (data, name, content digest) or raises `ImageError`: the image check.
ImageCheck = Callable[[bytes, str, str], None]
# `Reporter.progress`: (description, total or None) -> a context yielding `advance(n=1)`.
Progress = Callable[[str, "int | None"], ContextManager[Callable[..., None]]]
IGNORED_DIR_NAMES = frozenset({"__MACOSX", "__pycache__"})
# The folder names (compared case-insensitively) that mark a split rather than a class.
SPLIT_NAMES: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "valid": ("valid", "val", "validation", "dev"),
    "test": ("test", "testing"),
}
SPLIT_DIR_NAMES = tuple(name for names in SPLIT_NAMES.values() for name in names)


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
    """The checked, split data of a run; `test` is the held-out `test/` folder when there is one."""

    task: ClassVar[str] = "classification"  # one label per image (`graft.input.multilabel`: several)
    root: Path
    class_names: list[str]
    train: LabelledImages
    val: LabelledImages
    split: str  # "folders" (train/ and valid/ given), "seeded" (drawn by graft) or "csv"
    seed: int
    val_fraction: float
    bad_images: list[BadImage] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    test: LabelledImages | None = None

    def summary(self) -> dict[str, object]:
        train_counts = self.train.counts()
        sizes = [c for c in train_counts.values() if c]
        summary: dict[str, object] = {
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
        if self.test is not None:
            summary.update(num_test=len(self.test), test_per_class=self.test.counts())
        return summary

    def split_record(self) -> dict[str, object]:
        """Which file went where, relative to the data root: enough to repeat the split."""

        def rows(images: LabelledImages) -> list[list[str]]:
            return [[relative_path(p, self.root), self.class_names[y]] for p, y in zip(images.paths, images.labels)]

        record: dict[str, object] = {
            "split": self.split,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "class_names": self.class_names,
            "train": rows(self.train),
            "val": rows(self.val),
        }
        if self.test is not None:
            record["test"] = rows(self.test)
        return record


Item = tuple[Path, int]  # an image path and its class index


def load_dataset(
    source: str | Path,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    on_bad_image: OnBadImage = "error",
    workers: int | None = None,
    decode: ImageCheck | None = None,
    checked: CheckedFiles | None = None,
    progress: Progress | None = None,
) -> Dataset:
    """Find, check and split the labelled images under `source` (a folder or a CSV file).

    `decode` and `checked` are `verify_images`'s; `progress` (`Reporter.progress`) shows the
    listing and the check file by file."""
    if on_bad_image not in ("error", "skip"):
        raise ConfigError(f"--on-bad-image: expected 'error' or 'skip', got {on_bad_image!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"--val-fraction: expected a number between 0 and 1, got {val_fraction}")
    root = Path(source)
    warnings: list[str] = []
    test_items: list[Item] | None = None
    if root.is_file() and root.suffix.lower() == ".csv":
        class_names, items = read_csv_labels(root, warnings)
        train_items, val_items = _seeded_split(items, val_fraction, seed, warnings)
        split = "csv"
        base = root.parent
    elif root.is_dir():
        base = root
        with (progress or _no_progress)("listing images", None) as advance:
            split, class_names, train_items, val_items, test_items = _read_folder(root, val_fraction, seed, warnings, advance)
    elif root.exists():
        raise DataError(f"{root}: expected a folder of class sub-folders or a .csv file with path,label columns")
    else:
        raise DataError(f"{root}: no such folder or file; give the folder that holds one sub-folder per class")

    if len(class_names) < 2:
        raise DataError(
            f"{root}: found {len(class_names)} class ({', '.join(class_names) or 'none'}); "
            "a classifier needs at least 2 classes, each in its own sub-folder with images"
        )
    all_paths = [p for p, _ in train_items + val_items + (test_items or [])]
    digests, bad = verify_images(all_paths, workers=workers, decode=decode, checked=checked, progress=progress)
    if bad and on_bad_image == "error":
        _refuse_bad_images(bad, len(all_paths), root)
    if bad:
        warnings.append(f"skipped {len(bad)} unreadable image(s) (listed in the data summary)")
    train = _labelled([(p, y) for p, y in train_items if p in digests], class_names, digests)
    val = _labelled([(p, y) for p, y in val_items if p in digests], class_names, digests)
    test = None if test_items is None else _labelled([(p, y) for p, y in test_items if p in digests], class_names, digests)
    _check_usable(root, train, val, warnings)
    _warn_identical_contents(base, {"training": train, "validation": val, "test": test}, warnings)
    return Dataset(
        root=base, class_names=class_names, train=train, val=val, split=split, seed=seed,
        val_fraction=val_fraction, bad_images=bad, warnings=warnings, test=test,
    )


def load_labelled_folder(source: str | Path, *, on_bad_image: OnBadImage = "error") -> tuple[LabelledImages, list[BadImage]]:
    """A labelled folder (one sub-folder per class, or a CSV) as one set, for evaluation."""
    root = Path(source)
    warnings: list[str] = []
    if root.is_file() and root.suffix.lower() == ".csv":
        class_names, items = read_csv_labels(root, warnings)
    elif root.is_dir():
        parts = split_folders(root)
        if parts:
            named = ", ".join(f"{d.name}/" for d in parts.values())
            example = parts.get("test") or parts.get("valid") or parts["train"]
            raise DataError(
                f"{root}: holds split folders ({named}), not one sub-folder per class; "
                f"give the split to evaluate on, e.g. {example}"
            )
        class_names, found = scan_class_folders(root, warnings, data_root=root)
        _one_label_per_file([(p, c, "") for p, c in found], warnings)
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


def split_folders(root: Path) -> dict[str, Path]:
    """The split folders directly under `root`, by role ("train", "valid", "test"); case-insensitive.

    Two folders for one role (`val/` and `valid/`, `Train/` and `train/`) are refused by name.
    """
    found: dict[str, list[Path]] = {}
    for entry in sorted(root.iterdir()):
        role = split_role(entry.name)
        if role is not None and entry.is_dir():
            found.setdefault(role, []).append(entry)
    for role, folders in found.items():
        if len(folders) > 1:
            names = " and ".join(f"{f.name}/" for f in folders)
            raise DataError(
                f"{root}: {names} are both {role} folders; keep one (merge their class folders into it)"
            )
    return {role: folders[0] for role, folders in found.items()}


def split_role(name: str) -> str | None:
    """"train", "valid" or "test" when a folder name is a split's name (any case), else None."""
    lowered = name.lower()
    return next((role for role, names in SPLIT_NAMES.items() if lowered in names), None)


def scan_class_folders(
    root: Path, warnings: list[str], *, data_root: Path | None = None, found_one: Callable[[], None] | None = None
) -> tuple[list[str], list[tuple[Path, str]]]:
    """(class names in sorted order, [(image path, class name)]) under one sub-folder per class.

    Links are followed only inside `data_root` (default `root`); files that are not regular files
    (a FIFO, a socket, a device) are skipped with a warning, since reading one would block.
    """
    data_root = data_root or root
    class_dirs = []
    for entry in sorted(root.iterdir()):
        if _ignored_name(entry.name) or not entry.is_dir():
            continue
        if entry.is_symlink() and not _within(os.path.realpath(entry), os.path.realpath(data_root)):
            warnings.append(
                f"{entry}: a symbolic link to {os.path.realpath(entry)}, outside the data folder {data_root}; "
                "not followed (copy or move that class folder into the data folder)"
            )
            continue
        class_dirs.append(entry)
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
        if split_role(class_dir.name) is not None:
            warnings.append(
                f"{class_dir}: the class folder '{class_dir.name}' has a split folder's name; if it is a split, "
                f"it belongs directly in the data folder next to train/, not among the classes"
            )
        listed = walk_images(class_dir, root=data_root, warnings=warnings)
        images = [p for p in sorted(_counted(listed, found_one)) if _regular_or_warn(p, warnings)]
        if not images:
            warnings.append(f"{class_dir}: empty class folder (no images) skipped")
            continue
        names.append(class_dir.name)
        found.extend((p, class_dir.name) for p in images)
    return names, found


def read_csv_labels(csv_path: Path, warnings: list[str] | None = None) -> tuple[list[str], list[Item]]:
    """Read a `path,label` CSV (paths relative to the CSV's folder).

    Each image counts once, by its resolved path: a repeated row is dropped with a warning, and
    one image given two labels is refused, naming both lines.
    """
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
    first_row: dict[str, tuple[int, str]] = {}  # resolved path -> (line, label) of its first row
    repeats: list[str] = []
    conflicts: list[str] = []
    for line, row in enumerate(rows, start=2):
        if not row.get("path") or not row.get("label"):
            raise DataError(f"{csv_path}, line {line}: empty path or label; every row needs both")
        path = Path(row["path"])
        path = path if path.is_absolute() else csv_path.parent / path
        key = os.path.realpath(path)
        if key in first_row:
            first_line, first_label = first_row[key]
            if first_label == row["label"]:
                repeats.append(f"line {line} repeats line {first_line}")
            else:
                conflicts.append(f"line {line} labels {row['path']} '{row['label']}', line {first_line} '{first_label}'")
            continue
        first_row[key] = (line, row["label"])
        pairs.append((path, row["label"]))
    if conflicts:
        raise DataError(
            f"{csv_path}: {len(conflicts)} image(s) have two labels ({'; '.join(conflicts[:10])}"
            f"{'; ...' if len(conflicts) > 10 else ''}); give each image one row with its one label"
        )
    if repeats and warnings is not None:
        warnings.append(
            f"{csv_path}: {len(repeats)} repeated row(s) ignored, each image is used once "
            f"({'; '.join(repeats[:5])}{'; ...' if len(repeats) > 5 else ''})"
        )
    class_names = sorted({label for _, label in pairs})
    index = {name: i for i, name in enumerate(class_names)}
    return class_names, [(p, index[label]) for p, label in pairs]


def verify_images(
    paths: list[Path],
    *,
    workers: int | None = None,
    decode: ImageCheck | None = None,
    checked: CheckedFiles | None = None,
    progress: Progress | None = None,
) -> tuple[dict[Path, str], list[BadImage]]:
    """Decode every image once; returns ({path: content digest} for good ones, [bad ones]).

    `decode(data, name, digest)` decodes one file's bytes (raising `ImageError`); a training run
    passes one that decodes at the model's size and keeps the result for the first extraction
    (`graft.input.pipeline.eval_view_check`), so checking costs no decode of its own. Without
    it, the check decodes at the smallest scale a JPEG offers (`load_image(min_size=1)`: every
    byte is still read and entropy-decoded, so truncated or damaged files are still found).
    A file `checked` knows with the same size and modification time is neither read nor decoded.
    """
    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    decode = decode or _smallest_decode

    def check(path: Path) -> tuple[Path, str | None, str | None]:
        try:
            info = _stat(path)
            known = checked.digest(path, info) if checked is not None and info is not None else None
            if known is not None:
                return path, known, None
            data = read_image_file(path)  # refuses a FIFO or device rather than blocking on it
            digest = file_digest(data)
            decode(data, str(path), digest)
        except ImageError as exc:
            return path, None, exc.reason
        if checked is not None and info is not None:
            checked.add(path, info, digest)
        return path, digest, None

    digests: dict[Path, str] = {}
    bad: list[BadImage] = []
    with (progress or _no_progress)("checking images", len(paths)) as advance, ThreadPoolExecutor(max_workers=workers) as pool:
        for path, digest, reason in pool.map(check, paths):
            advance()
            if digest is None:
                bad.append(BadImage(str(path), reason or "unreadable"))
            else:
                digests[path] = digest
    if checked is not None:
        checked.save()
    return digests, bad


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None  # read_image_file says why


def _refuse_bad_images(bad: list[BadImage], count: int, root: Path) -> None:
    listing = "\n".join(f"  {b.path}: {b.reason}" for b in bad[:50])
    more = f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
    raise DataError(
        f"{len(bad)} of {count} images in {root} cannot be used:\n{listing}{more}\n"
        "Fix or remove them, or pass --on-bad-image skip to train without them."
    )


def _counted(paths: Iterator[Path], found_one: Callable[[], None] | None) -> Iterator[Path]:
    for path in paths:
        if found_one is not None:
            found_one()
        yield path


def _smallest_decode(data: bytes, name: str, digest: str) -> None:
    load_image(data, name=name, min_size=1)


@contextlib.contextmanager
def _no_progress(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    yield lambda n=1, status=None: None


class CheckedFiles:
    """The image files earlier runs decoded without error: resolved path, size, mtime, digest.

    A file whose size and modification time (in ns) are unchanged is trusted without reading it
    again, as `make` and git's index trust a file's stat: on a folder of phone photos whose
    features are cached, a second run then reads no image at all (hashing alone costs about a
    fifteenth of a decode at the model's size, docs/performance.md). Kept as
    `checked-files.json` in graft's cache folder; a lost or damaged record only means checking again.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / "checked-files.json"
        self._lock = threading.Lock()
        self._added = False
        try:
            loaded = json.loads(self.path.read_text())
            self._files: dict[str, list] = loaded["files"] if loaded.get("format") == 1 else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self._files = {}

    def digest(self, path: Path, info: os.stat_result) -> str | None:
        """The digest recorded for `path` if its size and mtime still match the record."""
        entry = self._files.get(os.path.realpath(path))
        if entry and entry[0] == info.st_size and entry[1] == info.st_mtime_ns:
            return str(entry[2])
        return None

    def add(self, path: Path, info: os.stat_result, digest: str) -> None:
        with self._lock:
            self._files[os.path.realpath(path)] = [info.st_size, info.st_mtime_ns, digest]
            self._added = True

    def save(self) -> None:
        """Write the record if it changed; a cache folder that cannot be written costs only speed."""
        if not self._added:
            return
        try:
            write_text(self.path, json.dumps({"format": 1, "files": self._files}, separators=(",", ":")))
        except OutputError:
            pass
        self._added = False


def file_digest(data: bytes) -> str:
    """The content key of an image file (its bytes, not its name)."""
    return hashlib.sha256(data).hexdigest()[:32]


def walk_images(folder: Path, *, root: Path | None = None, warnings: list[str] | None = None) -> Iterator[Path]:
    """The image files under `folder`, each real file once, hidden files and folders skipped.

    Symbolic links are followed, except a link to a folder that holds it (a loop) and, when
    `root` is given, a link whose target lies outside `root`; each is named in `warnings`.
    """
    top = os.path.realpath(root) if root is not None else None
    seen_dirs: set[str] = set()
    seen_files: set[str] = set()

    def note(message: str) -> None:
        if warnings is not None:
            warnings.append(message)

    def visit(directory: Path, real: str) -> Iterator[Path]:
        if real in seen_dirs:
            return
        seen_dirs.add(real)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            note(f"{directory}: cannot be listed ({exc.strerror or exc}); skipped")
            return
        for entry in entries:
            if _ignored_name(entry.name):
                continue
            path = directory / entry.name
            target = os.path.realpath(path)
            if entry.is_symlink() and top is not None and not _within(target, top):
                if entry.is_dir() or is_image_name(path):
                    outside.append(f"{path} -> {target}")
                continue
            if entry.is_dir():  # follows a link
                if entry.is_symlink() and _within(real, target):
                    note(f"{path}: a symbolic link to {target}, a folder that holds it (a loop); not followed")
                    continue
                yield from visit(path, target)
            elif is_image_name(path) and target not in seen_files:
                seen_files.add(target)
                yield path

    outside: list[str] = []
    yield from visit(Path(folder), os.path.realpath(folder))
    if outside:
        note(
            f"{len(outside)} symbolic link(s) lead outside the data folder {root} and are not followed "
            f"(copy the files in instead): {'; '.join(outside[:5])}{'; ...' if len(outside) > 5 else ''}"
        )


# --- helpers --------------------------------------------------------------------------------------


def _read_folder(
    root: Path, val_fraction: float, seed: int, warnings: list[str], found_one: Callable[[], None]
) -> tuple[str, list[str], list[Item], list[Item], list[Item] | None]:
    """(split kind, class names, train, validation, test or None) of an image folder."""
    parts = split_folders(root)
    if not parts:
        class_names, found = scan_class_folders(root, warnings, found_one=found_one)
        _one_label_per_file([(p, c, "") for p, c in found], warnings)
        index = {name: i for i, name in enumerate(class_names)}
        train, val = _seeded_split([(p, index[c]) for p, c in found], val_fraction, seed, warnings)
        return "seeded", class_names, train, val, None
    if "train" not in parts:
        named = " and ".join(f"{d.name}/" for d in parts.values())
        raise DataError(
            f"{root}: has {named} but no training folder; put the training images in {root}/train/<class>/ "
            f"(or, if {named} holds a class rather than a split, rename it: "
            f"{', '.join(SPLIT_DIR_NAMES)} name split folders in any case)"
        )
    beside = sorted(e.name for e in root.iterdir() if e.is_dir() and not _ignored_name(e.name) and e not in parts.values())
    if beside:
        warnings.append(f"{root}: folders beside the split folders are ignored: {', '.join(beside)}")
    if "test" in parts and not _has_class_folders(parts["test"]):
        warnings.append(f"{parts['test']}: no class sub-folders (unlabelled images?); the test folder is ignored")
        del parts["test"]
    scanned = {role: scan_class_folders(folder, warnings, data_root=root, found_one=found_one) for role, folder in parts.items()}
    class_names = scanned["train"][0]
    for role in ("valid", "test"):
        if role in scanned:
            extra = sorted(set(scanned[role][0]) - set(class_names))
            if extra:
                raise DataError(
                    f"{parts[role]}: classes {extra} have {role} images but no folder in "
                    f"{parts['train']}; every class needs training images"
                )
    kept = _one_label_per_file(
        [(p, c, role) for role in ("train", "valid", "test") if role in scanned for p, c in scanned[role][1]], warnings
    )
    index = {name: i for i, name in enumerate(class_names)}
    items = {role: [(p, index[c]) for p, c, r in kept if r == role] for role in ("train", "valid", "test")}
    test = items["test"] if "test" in parts else None
    if "valid" in parts:
        return "folders", class_names, items["train"], items["valid"], test
    warnings.append(
        f"{root}: no validation folder ({', '.join(SPLIT_NAMES['valid'])}) beside {parts['train'].name}/: "
        f"validation images are drawn from it (seed {seed}, fraction {val_fraction:g}, recorded in split.json)"
    )
    train, val = _seeded_split(items["train"], val_fraction, seed, warnings)
    return "seeded", class_names, train, val, test


def _one_label_per_file(
    found: list[tuple[Path, str, str]], warnings: list[str]
) -> list[tuple[Path, str, str]]:
    """(path, class, part) with each resolved file once; a file under two classes is refused.

    The first occurrence (train before valid before test) keeps a file reached twice with one class.
    """
    first: dict[str, tuple[Path, str, str]] = {}
    kept: list[tuple[Path, str, str]] = []
    conflicts: list[str] = []
    repeats: list[str] = []
    for path, name, part in found:
        key = os.path.realpath(path)
        if key not in first:
            first[key] = (path, name, part)
            kept.append((path, name, part))
        elif first[key][1] != name:
            conflicts.append(f"{first[key][0]} (class {first[key][1]}) and {path} (class {name})")
        else:
            repeats.append(f"{path} is {first[key][0]}")
    if conflicts:
        raise DataError(
            f"{len(conflicts)} file(s) are reached under two classes through symbolic links: "
            f"{'; '.join(conflicts[:10])}{'; ...' if len(conflicts) > 10 else ''}; "
            "a file has one label: remove the link that puts it in the wrong class"
        )
    if repeats:
        warnings.append(
            f"{len(repeats)} file(s) reached twice through symbolic links are used once, in the first split that has them: "
            f"{'; '.join(repeats[:5])}{'; ...' if len(repeats) > 5 else ''}"
        )
    return kept


def _warn_identical_contents(root: Path, parts: dict[str, LabelledImages | None], warnings: list[str]) -> None:
    """Warn when identical files (same SHA-256) carry two labels, or lie on both sides of the split."""
    first: dict[str, tuple[str, Path, str]] = {}  # digest -> (part, path, class) of its first file
    two_labels: list[str] = []
    leaked: dict[str, list[str]] = {}
    for part, images in parts.items():
        if images is None:
            continue
        for path, label, digest in zip(images.paths, images.labels, images.digests):
            name = images.class_names[label]
            if digest not in first:
                first[digest] = (part, path, name)
                continue
            first_part, first_path, first_name = first[digest]
            pair = f"{relative_path(first_path, root)} = {relative_path(path, root)}"
            if first_name != name:
                two_labels.append(f"{pair} ({first_name}, {name})")
            elif first_part != part:
                leaked.setdefault(f"{part} image(s) identical to {first_part} images", []).append(pair)
    if two_labels:
        warnings.append(
            f"{len(two_labels)} identical file(s) are labelled with two classes: "
            f"{'; '.join(two_labels[:5])}{'; ...' if len(two_labels) > 5 else ''}; remove or relabel one of each"
        )
    for what, pairs in leaked.items():
        warnings.append(
            f"{len(pairs)} {what} (the same picture on both sides: scores overstate the model): "
            f"{'; '.join(pairs[:5])}{'; ...' if len(pairs) > 5 else ''}"
        )


def _has_class_folders(folder: Path) -> bool:
    return any(entry.is_dir() and not _ignored_name(entry.name) for entry in folder.iterdir())


def _within(path: str, folder: str) -> bool:
    """True when the resolved `path` is `folder` or lies below it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _regular_or_warn(path: Path, warnings: list[str]) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return True  # a dangling link: verify_images lists it with its reason
    if stat.S_ISREG(mode):
        return True
    warnings.append(f"{path}: not a regular file (a FIFO, socket or device); skipped")
    return False


def _ignored_name(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_DIR_NAMES


def _seeded_split(
    items: list[Item], val_fraction: float, seed: int, warnings: list[str]
) -> tuple[list[Item], list[Item]]:
    """Stratified: each class keeps round(n * val_fraction) (at least 1 when it has 2+) for validation."""
    by_class: dict[int, list[Item]] = {}
    for item in sorted(items, key=lambda pair: (pair[1], str(pair[0]))):
        by_class.setdefault(item[1], []).append(item)
    rng = random.Random(seed)
    train: list[Item] = []
    val: list[Item] = []
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


def _labelled(items: list[Item], class_names: list[str], digests: dict[Path, str]) -> LabelledImages:
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
