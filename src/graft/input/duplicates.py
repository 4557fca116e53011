"""Exact and near duplicates among labelled images: candidates from features and thumbnails, verified by pixels.

Each image proposes its `CANDIDATES` closest images by the frozen backbone's features (cosine,
centred on the folder's mean) and by a small colour thumbnail (pixel correlation), so the work
grows as N x `CANDIDATES`, not N x N. A candidate pair is verified on the thumbnails: one is
cropped by up to `MAX_CROP` of each side and resampled onto the other (`WINDOWS`), and the best
structural similarity (SSIM, Wang et al. 2004, over the whole thumbnail: it compares brightness
and contrast as well as the pattern, so a darker picture with the same outline is not a copy) is
kept. The pair is a near copy when it is far closer than either image's neighbours, its distance
(1 - similarity) at most `DISTINCT` times the distance to the `REFERENCE`-th closest candidate
(the geometric mean over the two), and its similarity, aligned more finely (`FINE_WINDOWS`)
where needed, is at least `MIN_SIMILARITY`. The first condition is Lowe's distinctiveness test:
a re-encoded, resized or slightly cropped copy stands out from the images around its source,
while two plain trousers or two many-pointed stars sit among look-alikes that are as close.
Exact duplicates are files with the same content (SHA-256), always reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image
from threadpoolctl import threadpool_limits

THUMB_SIDE = 48  # thumbnails kept per image: 48 x 48 RGB, 6.9 kB
GRID = 32  # side of the grid the pixels are compared on
MAX_CROP = 0.1
CANDIDATES = 8
REFERENCE = 5
MIN_SIMILARITY = 0.95
SSIM_C1, SSIM_C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2  # SSIM's constants for 8-bit pixels
DISTINCT = 0.25
BLOCK = 1024  # rows compared at a time: memory stays at BLOCK x N whatever the folder's size


def _windows(steps: int) -> list[tuple[float, float, float, float]]:
    """Crop boxes of a thumbnail: per axis the whole side, or `steps` - 1 shorter lengths down to
    1 - `MAX_CROP` of it, each at `steps` places from the start to the end."""
    per_axis = [(0.0, float(THUMB_SIDE))]
    for keep in np.linspace(1, 1 - MAX_CROP, steps)[1:].tolist():
        per_axis += [(share * (1 - keep) * THUMB_SIDE, keep * THUMB_SIDE) for share in np.linspace(0, 1, steps).tolist()]
    return [(x, y, x + width, y + height) for x, width in per_axis for y, height in per_axis]


WINDOWS = _windows(3)  # 49 crops: 95 % and 90 % of a side at its start, middle or end; every candidate pair
FINE_WINDOWS = _windows(5)  # 441 crops, 2.5 % apart: a pair that stands out but is not yet similar enough


@dataclass(frozen=True)
class DuplicatePair:
    """Images `first` < `second` (indices) that show the same picture; `exact` when the files are equal."""

    first: int
    second: int
    structural: float
    cosine: float
    exact: bool

    @property
    def similarity(self) -> float:
        """1 for identical files, else the pixels' structural similarity once aligned (the closer, the surer)."""
        return 1.0 if self.exact else round(self.structural, 4)


def thumbnail(image: Image.Image) -> np.ndarray:
    """The picture squeezed to `THUMB_SIDE` x `THUMB_SIDE` RGB, as uint8 (what near copies are verified on)."""
    return np.asarray(image.convert("RGB").resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS, reducing_gap=2.0))


def find_duplicates(thumbnails: np.ndarray, features: np.ndarray, digests: Sequence[str]) -> list[DuplicatePair]:
    """Every pair of exact or near duplicates among N images, ordered by (first, second).

    `thumbnails` is (N, THUMB_SIDE, THUMB_SIDE, 3) uint8 from `thumbnail` (the row of an
    unreadable image, whose digest is "", is ignored), `features` (N, D) the pooled features.
    """
    valid = np.array([bool(d) for d in digests], dtype=bool)
    pairs: list[DuplicatePair] = []
    if valid.sum() >= 2:
        unit = _centred_units(features, valid)
        views = _Views.of(np.stack([_view(t, WINDOWS[0]) for t in thumbnails]))
        neighbours = _candidates(unit, views.units, valid)
        with threadpool_limits(1, user_api="blas"):  # thousands of small products: threads only contend
            similarity = _verify(thumbnails, views, neighbours)
            pairs = _distinct_pairs(similarity, thumbnails, unit, digests)
    pairs.extend(_exact_pairs_missed(pairs, digests))
    return sorted(pairs, key=lambda pair: (pair.first, pair.second))


def _view(thumb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    return np.asarray(Image.fromarray(thumb).resize((GRID, GRID), Image.Resampling.BILINEAR, box=box), dtype=np.float32)


@dataclass(frozen=True)
class _Views:
    """Pictures on the comparison grid: each flattened, centred and scaled to unit length (dot products
    are Pearson correlations), with its mean and standard deviation (what SSIM compares besides)."""

    units: np.ndarray
    means: np.ndarray
    deviations: np.ndarray

    @classmethod
    def of(cls, rows: np.ndarray) -> "_Views":
        flat = rows.reshape(len(rows), -1).astype(np.float32)
        means = flat.mean(axis=1)
        centred = flat - means[:, None]
        norms = np.linalg.norm(centred, axis=1)
        return cls(centred / np.maximum(norms, 1e-6)[:, None], means, norms / np.sqrt(flat.shape[1]))

    def ssim(self, other: "_Views", columns: list[int]) -> np.ndarray:
        """(len(self), len(columns)) SSIM over the whole picture, between these views and `other`'s `columns`."""
        # Not scikit-image's `structural_similarity`: it scores one pair at a time over sliding windows,
        # while one matrix product here scores every crop of an image against all its candidates.
        mean, deviation = other.means[columns], other.deviations[columns]
        covariance = (self.units @ other.units[columns].T) * np.outer(self.deviations, deviation)
        luminance = (2 * np.outer(self.means, mean) + SSIM_C1) / (self.means[:, None] ** 2 + mean ** 2 + SSIM_C1)
        return luminance * (2 * covariance + SSIM_C2) / (self.deviations[:, None] ** 2 + deviation ** 2 + SSIM_C2)


def _centred_units(features: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Features centred on the folder's mean (what every picture shares does not make two alike), unit length."""
    unit = features.astype(np.float32)
    unit = unit - unit[valid].mean(axis=0, keepdims=True)
    return unit / np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)


def _candidates(unit: np.ndarray, views: np.ndarray, valid: np.ndarray) -> list[set[int]]:
    """Per image, the `CANDIDATES` closest by features and by thumbnail, both ways (j near i makes i near j)."""
    count = len(unit)
    neighbours: list[set[int]] = [set() for _ in range(count)]
    take = min(CANDIDATES, int(valid.sum()) - 1)
    for start in range(0, count, BLOCK):
        block = slice(start, min(start + BLOCK, count))
        for similarity in (unit[block] @ unit.T, views[block] @ views.T):
            similarity[:, ~valid] = -np.inf
            similarity[np.arange(similarity.shape[0]), np.arange(block.start, block.stop)] = -np.inf
            closest = np.argpartition(-similarity, take - 1, axis=1)[:, :take]
            for row, columns in enumerate(closest):
                if valid[start + row]:
                    for column in columns.tolist():
                        neighbours[start + row].add(column)
                        neighbours[column].add(start + row)
    return neighbours


def _verify(thumbnails: np.ndarray, views: _Views, neighbours: list[set[int]]) -> dict[tuple[int, int], float]:
    """The best SSIM over `WINDOWS` of each candidate pair, either image cropped onto the other."""
    similarity: dict[tuple[int, int], float] = {}
    for image, partners in enumerate(neighbours):
        if not partners:
            continue
        cropped = _Views.of(np.stack([_view(thumbnails[image], box) for box in WINDOWS]))
        others = sorted(partners)
        for other, value in zip(others, cropped.ssim(views, others).max(axis=0).tolist()):
            key = (min(image, other), max(image, other))
            similarity[key] = max(similarity.get(key, -1.0), value)
    return similarity


def _distinct_pairs(
    similarity: dict[tuple[int, int], float], thumbnails: np.ndarray, unit: np.ndarray, digests: Sequence[str],
) -> list[DuplicatePair]:
    """The verified pairs that stand out from both images' other candidates and are alike, those
    under `MIN_SIMILARITY` measured again with `FINE_WINDOWS` (thin lines need a finer alignment)."""
    distances: dict[int, list[float]] = {}
    for (first, second), value in similarity.items():
        distances.setdefault(first, []).append(1 - value)
        distances.setdefault(second, []).append(1 - value)
    # Missing candidates (a tiny folder) count as unrelated pictures, at distance 1; none counts farther.
    reference = {image: sorted(found + [1.0] * REFERENCE)[REFERENCE - 1] for image, found in distances.items()}
    pairs = []
    for (first, second), value in sorted(similarity.items()):
        local = float(np.sqrt(max(reference[first], 0.0) * max(reference[second], 0.0)))
        if 1 - value > DISTINCT * local:
            continue
        if value < MIN_SIMILARITY:
            value = max(_best_ssim(thumbnails[first], thumbnails[second]), _best_ssim(thumbnails[second], thumbnails[first]))
        if value >= MIN_SIMILARITY:
            cosine = float(unit[first] @ unit[second])
            pairs.append(DuplicatePair(first, second, value, cosine, digests[first] == digests[second]))
    return pairs


def _best_ssim(cropped: np.ndarray, whole: np.ndarray) -> float:
    """The best SSIM of `whole`'s picture with any of `FINE_WINDOWS` of `cropped`."""
    views = _Views.of(np.stack([_view(cropped, box) for box in FINE_WINDOWS]))
    return float(views.ssim(_Views.of(_view(whole, WINDOWS[0])[None]), [0]).max())


def _exact_pairs_missed(found: list[DuplicatePair], digests: Sequence[str]) -> list[DuplicatePair]:
    """Identical files always pair up, whatever their neighbours (ten copies of one file stand out from none)."""
    seen = {(p.first, p.second) for p in found}
    by_digest: dict[str, list[int]] = {}
    for index, digest in enumerate(digests):
        if digest:
            by_digest.setdefault(digest, []).append(index)
    missed = []
    for members in by_digest.values():
        for position, first in enumerate(members):
            for second in members[position + 1:]:
                if (first, second) not in seen:
                    missed.append(DuplicatePair(first, second, 1.0, 1.0, True))
    return missed
