"""Images with several labels each: a CSV read, checked and split for multi-label training.

Two CSV layouts are read, paths relative to the CSV's folder:

    path,labels                       path,smile,face,cat
    a.png,smile;face                  a.png,1,1,0
    b.png,cat                         b.png,0,0,1
    c.png,                            c.png,0,0,0

In `labels` the names are separated by `;` or `|` (one of the two per file); an empty cell means
no label (a negative for every label). An optional `split` column holds out `test` rows and may
fix the validation rows (`valid`); otherwise a seeded, iteratively stratified split (Sechidis et
al. 2011, the `iterative-stratification` package) keeps each label's share of positives on both
sides. `split.json` records the split. A bad row (missing file, another separator, an empty label name, a value
other than 0/1) is a `DataError` naming the CSV line.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from graft.config import TASKS
from graft.errors import ConfigError, DataError
from graft.input.data import BadImage, Dataset, LabelledImages, OnBadImage, load_dataset, relative_path, verify_images

SEPARATORS = (";", "|")
# Characters that separate names in other tools' CSVs: refused, so "a,b" never becomes one label.
FOREIGN_SEPARATORS = (",", "\t", "/")
SPLIT_VALUES = {"train": "train", "training": "train", "valid": "valid", "val": "valid", "validation": "valid",
                "dev": "valid", "test": "test", "testing": "test"}

Row = tuple[int, Path, frozenset[str], str | None]  # CSV line, image path, its label names, its split or None


@dataclass
class MultiLabelImages(LabelledImages):
    """Image paths with multi-hot `labels` (one 0/1 per name of `class_names`, each row)."""

    def counts(self) -> dict[str, int]:
        """Positives per label."""
        totals = np.asarray(self.labels, dtype=np.int64).reshape(-1, len(self.class_names)).sum(0)
        return {name: int(n) for name, n in zip(self.class_names, totals)}

    def names_of(self, index: int) -> list[str]:
        """The label names of image `index`."""
        return [name for name, on in zip(self.class_names, self.labels[index]) if on]


@dataclass
class MultiLabelDataset(Dataset):
    """A `Dataset` whose images carry label sets (`MultiLabelImages`)."""

    task: ClassVar[str] = "multilabel"

    def summary(self) -> dict[str, object]:
        summary = super().summary()
        labels_per_image = [sum(row) for row in self.train.labels]
        summary.update(task=self.task, mean_labels_per_image=round(float(np.mean(labels_per_image)), 3) if labels_per_image else 0.0,
                       images_without_label=sum(1 for n in labels_per_image if n == 0))
        return summary

    def split_record(self) -> dict[str, object]:
        """Which file went where, with its label names joined by ';': enough to repeat the split."""
        record: dict[str, object] = {
            "split": self.split, "seed": self.seed, "val_fraction": self.val_fraction, "class_names": self.class_names,
            "task": self.task,
        }
        for part in ("train", "val", "test"):
            images = getattr(self, part)
            if images is not None:
                record[part] = [[relative_path(p, self.root), ";".join(images.names_of(i))] for i, p in enumerate(images.paths)]
        return record


def is_multilabel_csv(path: Path) -> bool:
    """True for a CSV whose header has a `labels` column, or 0/1 columns and no `label` column."""
    if not (path.is_file() and path.suffix.lower() == ".csv"):
        return False
    fields = _header(path)
    return "labels" in fields or ("path" in fields and "label" not in fields and len(_label_columns(fields)) > 0)


def load_task_dataset(source: str | Path, *, task: str = "auto", val_fraction: float = 0.2, seed: int = 0,
                      on_bad_image: OnBadImage = "error", **checking: Any) -> Dataset:
    """The run's data for `task` ("auto": multi-label for a multi-label CSV, else single-label).

    `checking` (`decode`, `checked`, `progress`) goes to `load_dataset` for single-label data."""
    if task not in TASKS:
        raise ConfigError(f"{task!r} is not one of {', '.join(TASKS)}", parameter="task")
    multilabel = is_multilabel_csv(Path(source))
    if task == "multilabel" and not multilabel:
        raise ConfigError(
            f"--task multilabel: {source} is not a multi-label CSV; give a CSV with path,labels columns "
            "(names separated by ';') or one 0/1 column per label", parameter="task")
    if task == "classification" and multilabel:
        raise ConfigError(
            f"--task classification: {source} gives several labels per image (a labels column or 0/1 columns); "
            "use --task multilabel (or auto), or a path,label CSV", parameter="task")
    if not multilabel:
        return load_dataset(source, val_fraction=val_fraction, seed=seed, on_bad_image=on_bad_image, **checking)
    return load_multilabel_dataset(Path(source), val_fraction=val_fraction, seed=seed, on_bad_image=on_bad_image)


def load_multilabel_dataset(csv_path: Path, *, val_fraction: float = 0.2, seed: int = 0,
                            on_bad_image: OnBadImage = "error") -> MultiLabelDataset:
    """Read, check and split a multi-label CSV (see the module's docstring)."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"--val-fraction: expected a number between 0 and 1, got {val_fraction}")
    class_names, rows = read_multilabel_csv(csv_path)
    digests, bad = _verify(csv_path, [p for _, p, _, _ in rows], on_bad_image)
    rows = [row for row in rows if row[1] in digests]
    parts = split_rows(rows, class_names, val_fraction, seed)
    images = {part: _images(chosen, class_names, digests) for part, chosen in parts.items()}
    warnings = [f"skipped {len(bad)} unreadable image(s) (listed in the data summary)"] if bad else []
    dataset = MultiLabelDataset(
        root=csv_path.parent, class_names=class_names, train=images["train"], val=images["valid"],
        split="csv" if any(r[3] == "valid" for r in rows) else "seeded", seed=seed, val_fraction=val_fraction,
        bad_images=bad, warnings=warnings, test=images.get("test"),
    )
    _check_usable(csv_path, dataset)
    return dataset


def read_multilabel_csv(csv_path: Path) -> tuple[list[str], list[Row]]:
    """(label names in sorted order, one row per image) of a multi-label CSV; bad rows are refused by line."""
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [f.strip() for f in next(reader, [])]
            lines = list(reader)
    except UnicodeDecodeError:
        raise DataError(f"{csv_path}: not a UTF-8 text CSV file") from None
    fields = [f.lower() for f in header]
    if "path" not in fields:
        raise DataError(f"{csv_path}: expected a header with a 'path' column and a 'labels' column (or one 0/1 column per label), found {header}")
    columns = _label_columns(fields) if "labels" not in fields else []
    if "labels" not in fields and not columns:
        raise DataError(f"{csv_path}: expected a 'labels' column or one 0/1 column per label beside 'path', found {header}")
    separator = _separator(csv_path, lines, fields) if "labels" in fields else None
    rows: list[Row] = []
    seen: dict[str, int] = {}
    for line, values in enumerate(lines, start=2):
        if not any(v.strip() for v in values):
            continue
        cells = {name: (values[i].strip() if i < len(values) else "") for i, name in enumerate(fields)}
        names = _names_from_cells(csv_path, line, cells, separator, [header[fields.index(c)] for c in columns])
        path = _existing_path(csv_path, line, cells["path"])
        key = os.path.realpath(path)
        if key in seen:
            raise DataError(f"{csv_path}, line {line}: {cells['path']} is already on line {seen[key]}; give each image one row with all its labels")
        seen[key] = line
        rows.append((line, path, names, _split_of(csv_path, line, cells.get("split", ""))))
    if not rows:
        raise DataError(f"{csv_path}: no rows; add one row per image")
    if columns:
        return [header[fields.index(c)] for c in columns], rows
    return sorted({n for _, _, labels, _ in rows for n in labels}), rows


def split_rows(rows: list[Row], class_names: list[str], val_fraction: float, seed: int) -> dict[str, list[Row]]:
    """{"train", "valid"[, "test"]}. Rows whose `split` cell says `test` are held out. With rows
    marked `valid`, the column is the split (an empty cell is training); otherwise the other rows
    are split by a seeded iterative stratification (sorted by path first, so the order of the CSV
    does not matter)."""
    parts = {part: [r for r in rows if r[3] == part] for part in ("train", "valid", "test")}
    rest = [r for r in rows if r[3] in (None, "train")]
    if parts["valid"]:
        split = {"train": rest, "valid": parts["valid"]}
    else:
        split = _stratified(rest, class_names, val_fraction, seed)
    return {**split, "test": parts["test"]} if parts["test"] else split


def _stratified(rows: list[Row], class_names: list[str], val_fraction: float, seed: int) -> dict[str, list[Row]]:
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit  # the split's maintained implementation

    if len(rows) < 2:
        return {"train": rows, "valid": []}
    ordered = sorted(rows, key=lambda r: str(r[1]))
    targets = multi_hot([r[2] for r in ordered], class_names)
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed % (2**32))
    train_index, val_index = next(splitter.split(np.zeros(len(ordered)), targets))
    return {"train": [ordered[i] for i in sorted(train_index)], "valid": [ordered[i] for i in sorted(val_index)]}


def multi_hot(label_sets: list[frozenset[str]], class_names: list[str]) -> np.ndarray:
    """(N, C) 0/1 array of the label sets over `class_names`."""
    index = {name: i for i, name in enumerate(class_names)}
    targets = np.zeros((len(label_sets), len(class_names)), dtype=np.int64)
    for row, names in enumerate(label_sets):
        for name in names:
            targets[row, index[name]] = 1
    return targets


# --- helpers --------------------------------------------------------------------------------------


def _header(path: Path) -> list[str]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            return [f.strip().lower() for f in next(csv.reader(handle), [])]
    except (OSError, UnicodeDecodeError):
        return []


def _label_columns(fields: list[str]) -> list[str]:
    return [f for f in fields if f and f not in ("path", "split", "label", "labels")]


def _separator(csv_path: Path, lines: list[list[str]], fields: list[str]) -> str:
    """The file's separator: `;` or `|`, whichever its labels use (`;` when no cell has two names)."""
    column = fields.index("labels")
    used: dict[str, int] = {}
    for line, values in enumerate(lines, start=2):
        cell = values[column] if column < len(values) else ""
        for character in SEPARATORS:
            if character in cell:
                used.setdefault(character, line)
    if len(used) > 1:
        raise DataError(
            f"{csv_path}, line {max(used.values())}: separates labels with "
            f"'{[c for c, n in used.items() if n == max(used.values())][0]}' while line {min(used.values())} uses "
            f"'{[c for c, n in used.items() if n == min(used.values())][0]}'; use one separator, ';' or '|', in the whole file")
    return next(iter(used), ";")


def _names_from_cells(csv_path: Path, line: int, cells: dict[str, str], separator: str | None, columns: list[str]) -> frozenset[str]:
    """The label names of one row: from the `labels` cell split on `separator`, or the 0/1 columns."""
    if separator is None:
        names = []
        for column in columns:
            value = cells[column.lower()]
            if value not in ("0", "1", ""):
                raise DataError(f"{csv_path}, line {line}: column '{column}' holds {value!r}; expected 1 (has the label) or 0")
            if value == "1":
                names.append(column)
        return frozenset(names)
    cell = cells["labels"]
    foreign = next((c for c in FOREIGN_SEPARATORS if c in cell), None)
    if foreign is not None:
        raise DataError(
            f"{csv_path}, line {line}: labels {cell!r} are separated by {foreign!r}; separate label names with "
            f"'{separator}' (e.g. smile{separator}face)")
    if not cell:
        return frozenset()
    names = [name.strip() for name in cell.split(separator)]
    if any(not name for name in names):
        raise DataError(f"{csv_path}, line {line}: labels {cell!r} hold an empty label name; remove the extra '{separator}'")
    return frozenset(names)


def _existing_path(csv_path: Path, line: int, value: str) -> Path:
    if not value:
        raise DataError(f"{csv_path}, line {line}: empty path; every row needs the image's path")
    path = Path(value)
    path = path if path.is_absolute() else csv_path.parent / path
    if not path.is_file():
        raise DataError(f"{csv_path}, line {line}: {value}: no such file (paths are relative to {csv_path.parent}); fix the path or remove the row")
    return path


def _split_of(csv_path: Path, line: int, value: str) -> str | None:
    if not value:
        return None
    if value.lower() not in SPLIT_VALUES:
        raise DataError(f"{csv_path}, line {line}: split {value!r}; expected train, valid or test (or an empty cell)")
    return SPLIT_VALUES[value.lower()]


def _verify(csv_path: Path, paths: list[Path], on_bad_image: OnBadImage) -> tuple[dict[Path, str], list[BadImage]]:
    digests, bad = verify_images(paths)
    if bad and on_bad_image == "error":
        listing = "\n".join(f"  {b.path}: {b.reason}" for b in bad[:50])
        raise DataError(f"{len(bad)} of {len(paths)} images in {csv_path} cannot be used:\n{listing}\n"
                        "Fix or remove them, or pass --on-bad-image skip to train without them.")
    return digests, bad


def _images(rows: list[Row], class_names: list[str], digests: dict[Path, str]) -> MultiLabelImages:
    return MultiLabelImages(paths=[r[1] for r in rows], labels=multi_hot([r[2] for r in rows], class_names).tolist(),
                            class_names=class_names, digests=[digests[r[1]] for r in rows])


def _check_usable(csv_path: Path, dataset: MultiLabelDataset) -> None:
    """At least two labels, each with a training positive, and validation images."""
    if len(dataset.class_names) < 2:
        raise DataError(f"{csv_path}: found {len(dataset.class_names)} label ({', '.join(dataset.class_names) or 'none'}); "
                        "multi-label training needs at least 2 label names")
    missing = [name for name, n in dataset.train.counts().items() if n == 0]
    if missing:
        raise DataError(f"{csv_path}: labels {missing} have no training image; add images with them or remove the label")
    if not len(dataset.val):
        raise DataError(f"{csv_path}: no validation images; add rows (or rows with split 'valid')")
    unvalidated = [name for name, n in dataset.val.counts().items() if n == 0]
    if unvalidated:
        dataset.warnings.append(f"labels {unvalidated} have no validation positive: their threshold stays 0.5 and their AP is not measured")
    sets = Counter(frozenset(dataset.train.names_of(i)) for i in range(len(dataset.train)))
    if len(sets) == 1:
        dataset.warnings.append(f"{csv_path}: every training image has the same labels; nothing tells them apart")


def load_labelled_sets(csv_path: Path, *, on_bad_image: OnBadImage = "error") -> tuple[MultiLabelImages, list[BadImage]]:
    """Every row of a multi-label CSV as one set of images, for evaluation (its `split` column ignored)."""
    class_names, rows = read_multilabel_csv(csv_path)
    digests, bad = _verify(csv_path, [p for _, p, _, _ in rows], on_bad_image)
    return _images([r for r in rows if r[1] in digests], class_names, digests), bad
