"""Exact and near duplicates among labelled images: a perceptual hash and the backbone's features.

Two images are near duplicates when their perceptual hashes (imagehash's 64-bit DCT `phash`)
differ in at most `HASH_CLOSE` bits and their features have a cosine of at least `CLOSE_COSINE`
(a re-encoded or resized copy), or when the hashes differ in at most `HASH_LOOSE` bits and the
cosine is at least `LOOSE_COSINE` (a slightly cropped or shifted copy, whose hash moves more).
The cosine is taken between the frozen backbone's features centred on the folder's mean: what
all the folder's pictures share (a white background, the same kind of object) does not make two
of them look alike. Requiring both signals keeps two different photos of one object (close
features, different hashes) and two different pictures with one layout (close hashes) apart.
Exact duplicates are files with the same content (SHA-256).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

HASH_BITS = 64
HASH_CLOSE = 6
CLOSE_COSINE = 0.85
HASH_LOOSE = 20
LOOSE_COSINE = 0.93
BLOCK = 1024  # rows compared at a time: memory stays at BLOCK x N whatever the folder's size


@dataclass(frozen=True)
class DuplicatePair:
    """Images `first` < `second` (indices) that show the same picture; `exact` when the files are equal."""

    first: int
    second: int
    hash_distance: int
    cosine: float
    exact: bool

    @property
    def similarity(self) -> float:
        """1 for identical files, else the cosine of the features (the closer, the surer)."""
        return 1.0 if self.exact else round(max(self.cosine, 1 - self.hash_distance / HASH_BITS), 4)


def perceptual_hash(image: "PIL.Image.Image") -> np.ndarray:  # noqa: F821
    """The 64-bit DCT perceptual hash of a picture, as 64 booleans."""
    import imagehash  # heavy: scipy and PyWavelets, loaded on use

    return np.asarray(imagehash.phash(image).hash, dtype=bool).reshape(-1)


def find_duplicates(hashes: np.ndarray, features: np.ndarray, digests: Sequence[str]) -> list[DuplicatePair]:
    """Every pair of exact or near duplicates among N images, ordered by (first, second).

    `hashes` is (N, 64) booleans from `perceptual_hash` (a row of an unreadable image is ignored
    when `digests` has "" for it), `features` (N, D) the pooled features.
    """
    count = len(digests)
    if count < 2:
        return []
    bits = hashes.astype(np.float32)
    unit = features.astype(np.float32)
    unit = unit - unit[np.array([bool(d) for d in digests])].mean(axis=0, keepdims=True)
    unit = unit / np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    valid = np.array([bool(d) for d in digests])
    pairs: list[DuplicatePair] = []
    for start in range(0, count, BLOCK):
        block = slice(start, min(start + BLOCK, count))
        # Hamming distance from dot products: bits that are 1 in one hash and 0 in the other.
        distance = bits[block] @ (1 - bits).T + (1 - bits[block]) @ bits.T
        cosine = unit[block] @ unit.T
        close = ((distance <= HASH_CLOSE) & (cosine >= CLOSE_COSINE)) | ((distance <= HASH_LOOSE) & (cosine >= LOOSE_COSINE))
        rows, cols = np.nonzero(close)
        for row, col in zip(rows.tolist(), cols.tolist()):
            first = start + row
            if col > first and valid[first] and valid[col]:
                pairs.append(DuplicatePair(first, col, int(distance[row, col]), float(cosine[row, col]), digests[first] == digests[col]))
    pairs.extend(_exact_pairs_missed(pairs, digests))
    return sorted(pairs, key=lambda pair: (pair.first, pair.second))


def _exact_pairs_missed(found: list[DuplicatePair], digests: Sequence[str]) -> list[DuplicatePair]:
    """Identical files always pair up, whatever their hashes say (a hash of a blank picture is 0)."""
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
                    missed.append(DuplicatePair(first, second, 0, 1.0, True))
    return missed
