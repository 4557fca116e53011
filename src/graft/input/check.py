"""What is wrong with a labelled image folder, before a model learns it: `check_dataset`.

Every finding is one row of `data_check.csv` (path, issue, score, suggested_label, detail), the
path relative to the data root (a class's row names its folder, `bag/`; a label of a label-set CSV
is `label: NAME`). The issues:

- `unreadable`: the file cannot be decoded (the reason is in `detail`);
- `label`: likely mislabelled (`graft.input.label_issues`: cleanlab on out-of-fold probabilities
  of a probe on the frozen features); `suggested_label` is the probe's class, `score` 1 minus
  the out-of-fold probability of the given label; one label per image only;
- `leak`: the same picture (exact or near duplicate, `graft.input.duplicates`) on both sides of
  the split: validation scores overstate the model; the row names the held-out copy;
- `duplicate`: the same picture twice on one side of the split;
- `small-class`: fewer than `MIN_CLASS_IMAGES` images (for label sets, carrying the label);
  `imbalanced`: `IMBALANCE` times fewer images than the largest class (one label per image only);
- `small-image`: shorter side under a quarter of the model's input and under half the folder's
  median (a folder of small images, such as 28-pixel scans, is one note, not a row per image);
- `grayscale`: a grayscale picture in a folder of colour pictures (at least `COLOUR_SET` of them).

`score` is in 0..1, higher meaning surer. Nothing here writes, moves or changes a user's file.
"""

from __future__ import annotations

import csv
import io
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from graft.atomic import write_json, write_text
from graft.console import Reporter
from graft.errors import ImageError
from graft.input.data import Dataset, relative_path
from graft.input.duplicates import THUMB_SIDE, DuplicatePair, find_duplicates, thumbnail
from graft.input.images import GRAY_MODES, image_size, load_image
from graft.input.label_issues import find_label_issues
from graft.models.backbones import Backbone
from graft.training.features import FeatureCache, extract_features

CHECK_FILES = ("data_check.csv", "data_check.json")
ISSUES = ("unreadable", "label", "leak", "duplicate", "small-class", "imbalanced", "small-image", "grayscale")
CSV_COLUMNS = ("path", "issue", "score", "suggested_label", "detail")
MIN_CLASS_IMAGES = 10
IMBALANCE = 5.0
SMALL_SHARE_OF_INPUT = 0.25
SCAN_SIDE = 64  # pictures are decoded at about this size for the thumbnail and the colour test
COLOUR_SET = 0.8  # share of colour pictures from which a grayscale one is out of place
GRAY_TOLERANCE = 3.0  # mean |R-G|, |G-B| (0-255) under which an RGB file is grayscale (JPEG chroma noise)


@dataclass(frozen=True)
class Finding:
    """One row of data_check.csv."""

    path: str
    issue: str
    score: float
    suggested_label: str = ""
    detail: str = ""


@dataclass
class DataCheck:
    """The findings on one labelled folder, worst issues first, and the folder-wide notes."""

    root: Path
    images: int
    findings: list[Finding]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        """Findings per issue, in `ISSUES` order (issues with none are left out)."""
        counted = {issue: sum(f.issue == issue for f in self.findings) for issue in ISSUES}
        return {issue: n for issue, n in counted.items() if n}

    def summary(self) -> str:
        """One line per issue found and per note, under a headline."""
        found = self.counts()
        head = f"data check: {self.images} images in {self.root}, " + (
            ", ".join(f"{n} {issue}" for issue, n in found.items()) if found else "no issue found"
        ) + f" ({self.seconds:.1f} s)"
        return "\n".join([head, *(f"  note: {n}" for n in self.notes)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root), "images": self.images, "counts": self.counts(), "notes": self.notes,
            "seconds": round(self.seconds, 3), "findings": [asdict(f) for f in self.findings],
        }


@dataclass(frozen=True)
class CheckedImages:
    """Every labelled image of a dataset in one list (training, then validation, then test)."""

    paths: list[Path]
    labels: list[int]
    parts: list[str]  # "train", "valid" or "test"
    digests: list[str]

    @classmethod
    def of(cls, dataset: Dataset) -> "CheckedImages":
        sets = [("train", dataset.train), ("valid", dataset.val), ("test", dataset.test)]
        present = [(part, images) for part, images in sets if images is not None]
        return cls(
            paths=[p for _, images in present for p in images.paths],
            labels=[y for _, images in present for y in images.labels],
            parts=[part for part, images in present for _ in images.paths],
            digests=[d for _, images in present for d in images.digests],
        )


@dataclass(frozen=True)
class ImageFacts:
    """What the pixels say, per image: (width, height) as stored, grayscale or not, a small thumbnail."""

    sizes: list[tuple[int, int]]
    gray: np.ndarray
    thumbnails: np.ndarray  # (N, THUMB_SIDE, THUMB_SIDE, 3) uint8


def run_check(
    dataset: Dataset, backbone: Backbone, *, cache: FeatureCache | None, precision: str, device: torch.device,
    reporter: Reporter, seed: int = 0, compile: bool = False,
) -> DataCheck:
    """`check_dataset` on the frozen `backbone`'s pooled features, taken from `cache` where present
    (a run with the same backbone, preprocessing and precision computed them already)."""
    started = time.perf_counter()
    images = CheckedImages.of(dataset)
    with reporter.progress("data check (features)", len(images.paths)) as advance:
        features = extract_features(
            backbone, images.paths, images.digests, cache=cache, precision=precision, device=device,
            progress=advance, compile=compile,
        )
    check = check_dataset(dataset, features.numpy(), input_size=backbone.preprocessing.input_size[-1], seed=seed)
    check.seconds = time.perf_counter() - started
    return check


def check_dataset(dataset: Dataset, features: np.ndarray, *, input_size: int, seed: int = 0) -> DataCheck:
    """The findings on `dataset`, whose images' pooled features (in `CheckedImages.of` order) are `features`.

    `input_size` is the side of the model's input (224 for EfficientNet-Lite0); `seed` seeds the
    folds of the label check. Reads the images (decoded small); writes nothing.
    """
    images = CheckedImages.of(dataset)
    facts = scan_images(images.paths)
    names, root = dataset.class_names, dataset.root
    findings = [Finding(relative_path(Path(b.path), root), "unreadable", 1.0, "", b.reason) for b in dataset.bad_images]
    label_sets = dataset.task == "multilabel"
    for issue in [] if label_sets else find_label_issues(features, np.array(images.labels), seed=seed):
        findings.append(Finding(
            relative_path(images.paths[issue.index], root), "label", round(1 - issue.given_probability, 4),
            names[issue.suggested], f"labelled {names[issue.given]}; out-of-fold probability of that label {issue.given_probability:.3f}",
        ))
    findings += _duplicate_findings(images, facts, features, root)
    class_findings, notes = _label_findings(dataset) if label_sets else _class_findings(dataset)
    image_findings, image_notes = _image_findings(images, facts, root, input_size)
    rank = {issue: i for i, issue in enumerate(ISSUES)}
    ordered = sorted(findings + class_findings + image_findings, key=lambda f: (rank[f.issue], -f.score, f.path))
    return DataCheck(root=root, images=len(images.paths), findings=ordered, notes=notes + image_notes)


def scan_images(paths: Sequence[Path], *, workers: int = 2) -> ImageFacts:
    """Sizes, grayscale flags and thumbnails; a file that cannot be decoded gets a black thumbnail."""
    blank = np.zeros((THUMB_SIDE, THUMB_SIDE, 3), dtype=np.uint8)

    def facts(path: Path) -> tuple[tuple[int, int], bool, np.ndarray]:
        try:
            size = image_size(path)
            picture = load_image(path, keep_gray=True, min_size=SCAN_SIDE)
        except ImageError:
            return (0, 0), False, blank
        return size, _is_gray(picture), thumbnail(picture)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        rows = list(pool.map(facts, paths))
    return ImageFacts(
        sizes=[r[0] for r in rows],
        gray=np.array([r[1] for r in rows], dtype=bool),
        thumbnails=np.stack([r[2] for r in rows]) if rows else np.zeros((0, THUMB_SIDE, THUMB_SIDE, 3), dtype=np.uint8),
    )


def write_check(check: DataCheck, folder: Path) -> None:
    """data_check.csv and data_check.json into `folder`, each written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for finding in check.findings:
        writer.writerow([finding.path, finding.issue, f"{finding.score:.4f}", finding.suggested_label, finding.detail])
    write_text(Path(folder) / "data_check.csv", buffer.getvalue())
    write_json(Path(folder) / "data_check.json", check.to_dict())


def _is_gray(picture: "PIL.Image.Image") -> bool:  # noqa: F821
    if picture.mode in GRAY_MODES:
        return True
    pixels = np.asarray(picture.convert("RGB"), dtype=np.int16)
    spread = np.abs(pixels[..., 0] - pixels[..., 1]).mean() + np.abs(pixels[..., 1] - pixels[..., 2]).mean()
    return float(spread) / 2 <= GRAY_TOLERANCE


def _duplicate_findings(images: CheckedImages, facts: ImageFacts, features: np.ndarray, root: Path) -> list[Finding]:
    """One row per copy, naming its twin (across the split if it has one there, else its closest):
    the held-out copy of a pair across the split (`leak`: the one to remove), else the later one."""
    best: dict[int, tuple[tuple[bool, float], int, DuplicatePair]] = {}  # reported image -> (rank, its twin, the pair)
    for pair in find_duplicates(facts.thumbnails, np.asarray(features), images.digests):
        first, second = pair.first, pair.second
        if images.parts[first] != images.parts[second] and images.parts[second] == "train":
            first, second = second, first
        rank = (images.parts[first] != images.parts[second], pair.similarity)  # a leak first, then the closest
        if second not in best or rank > best[second][0]:
            best[second] = (rank, first, pair)
    findings = []
    for second, (_, first, pair) in sorted(best.items()):
        leak = images.parts[first] != images.parts[second]
        kind = "identical file" if pair.exact else f"near copy (pixel SSIM {pair.structural:.3f} once aligned, feature cosine {pair.cosine:.3f})"
        findings.append(Finding(
            relative_path(images.paths[second], root), "leak" if leak else "duplicate", pair.similarity, "",
            f"{kind} of {relative_path(images.paths[first], root)} ({images.parts[first]})" + (f", in {images.parts[second]}" if leak else ""),
        ))
    return findings


def _class_findings(dataset: Dataset) -> tuple[list[Finding], list[str]]:
    """Classes with too few images, or far fewer than the largest, counted over every split."""
    train, val = dataset.train.counts(), dataset.val.counts()
    totals = {name: train[name] + val[name] for name in dataset.class_names}
    largest = max(totals.values(), default=0)
    findings = []
    for name, count in totals.items():
        folder = f"{name}/"
        if count < MIN_CLASS_IMAGES:
            findings.append(Finding(folder, "small-class", round(1 - count / MIN_CLASS_IMAGES, 4), "",
                                    f"{count} images (training and validation): too few to learn or to measure it"))
        elif largest >= IMBALANCE * count:
            findings.append(Finding(folder, "imbalanced", round(1 - count / largest, 4), "",
                                    f"{count} images against {largest} in the largest class; consider --class-weighting balanced"))
    return findings, []


def _label_findings(dataset: Dataset) -> tuple[list[Finding], list[str]]:
    """Labels of a label-set dataset carried by too few images, counted over training and validation.

    No `imbalanced` rows (labels are rarely balanced, and weighting them never raised mAP; docs/data.md)
    and no `label` rows: the wrong-label check's probe and thresholds were measured on one label per image."""
    train, val = dataset.train.counts(), dataset.val.counts()
    findings = [
        Finding(f"label: {name}", "small-class", round(1 - count / MIN_CLASS_IMAGES, 4), "",
                f"{count} images carry this label (training and validation): too few to learn or to measure it")
        for name, count in ((name, train[name] + val[name]) for name in dataset.class_names) if count < MIN_CLASS_IMAGES
    ]
    return findings, ["label sets: wrong labels are not looked for (the check does that for one label per image)"]


def _image_findings(images: CheckedImages, facts: ImageFacts, root: Path, input_size: int) -> tuple[list[Finding], list[str]]:
    """Pictures far smaller than the model's input, and grayscale ones among colour ones."""
    readable = [i for i, size in enumerate(facts.sizes) if size != (0, 0)]
    if not readable:
        return [], []
    sides = {i: min(facts.sizes[i]) for i in readable}
    median = statistics.median(sides.values())
    limit = min(SMALL_SHARE_OF_INPUT * input_size, median / 2)
    notes = []
    if median < SMALL_SHARE_OF_INPUT * input_size:
        notes.append(f"the images are small (median shorter side {median:g} px): each is upscaled to the model's {input_size} px input")
    findings = [
        Finding(relative_path(images.paths[i], root), "small-image", round(1 - side / input_size, 4), "",
                f"{facts.sizes[i][0]}x{facts.sizes[i][1]} px; the model sees {input_size} px and the folder's median side is {median:g} px")
        for i, side in sides.items() if side < limit
    ]
    colour = [i for i in readable if not facts.gray[i]]
    if len(colour) >= COLOUR_SET * len(readable):
        share = len(colour) / len(readable)
        findings += [
            Finding(relative_path(images.paths[i], root), "grayscale", round(share, 4), "",
                    f"grayscale, while {share:.0%} of the images are in colour")
            for i in readable if facts.gray[i]
        ]
    return findings, notes
