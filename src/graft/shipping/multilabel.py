"""A multi-label bundle's predictions: each image's label set, with a sigmoid score per label.

A bundle trained on label sets records `task: "multilabel"` and one threshold per label in
graft.json (chosen on validation to maximise each label's F1). An image has the labels whose
score reaches their threshold (or `threshold`, when given, for every label); `top_k` lists the
highest-scoring labels whether or not they are in the set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from graft.errors import ConfigError
from graft.input.images import load_image
from graft.training.metrics import multilabel_metrics


@dataclass(frozen=True)
class LabelSetPrediction:
    """One image's label set (`labels`: (label, score), highest first; may be empty). `label` and
    `score` are the best-scoring label whatever its threshold, and `top_k` the k best, as for a
    single-label prediction."""

    path: str
    labels: list[tuple[str, float]]
    label: str
    score: float
    top_k: list[tuple[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "labels": [{"label": label, "score": round(score, 6)} for label, score in self.labels],
            "top_k": [{"label": label, "score": round(score, 6)} for label, score in self.top_k],
        }


def check_threshold(threshold: float | None) -> None:
    """A `--threshold` is a score between 0 and 1."""
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0.0 <= float(threshold) <= 1.0):
        raise ConfigError(f"expected a score between 0 and 1, got {threshold!r}", parameter="threshold")


def label_sets(names: Sequence[str], logits: torch.Tensor, class_names: Sequence[str], thresholds: Sequence[float],
               top_k: int, threshold: float | None = None) -> list[LabelSetPrediction]:
    """The predictions of a batch's logits (N, C): sigmoid scores against the thresholds."""
    scores = logits.float().sigmoid()
    cuts = torch.full((len(class_names),), float(threshold)) if threshold is not None else torch.tensor(thresholds, dtype=torch.float32)
    k = max(1, min(top_k, len(class_names)))
    predictions = []
    for name, row in zip(names, scores):
        order = row.argsort(descending=True).tolist()
        pairs = [(class_names[i], float(row[i])) for i in order]
        chosen = [(class_names[i], float(row[i])) for i in order if row[i] >= cuts[i]]
        predictions.append(LabelSetPrediction(path=str(name), labels=chosen, label=pairs[0][0], score=pairs[0][1], top_k=pairs[:k]))
    return predictions


def bundle_scores(bundle: Any, paths: Sequence[Path], *, batch_size: int = 32) -> np.ndarray:
    """Sigmoid scores (N, C) of a bundle on image files, in the bundle's class order."""
    rows = []
    for start in range(0, len(paths), batch_size):
        images = [load_image(p, min_size=bundle.preprocessing.resize_size) for p in paths[start : start + batch_size]]
        rows.append(bundle.logits(images).float().sigmoid().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, len(bundle.class_names)))


def labelled_set_metrics(bundle: Any, paths: Sequence[Path], targets: Sequence[Sequence[int]], class_names: Sequence[str],
                         *, batch_size: int = 32) -> dict[str, Any]:
    """`multilabel_metrics` of a multi-label bundle on images with label sets over `class_names`
    (mapped to the bundle's order; a name the bundle lacks is refused), at its stored thresholds."""
    unknown = sorted(set(class_names) - set(bundle.class_names))
    if unknown:
        raise ConfigError(f"{bundle.path}: the data has labels {unknown} this bundle was not trained on; "
                          f"its labels are {', '.join(bundle.class_names)}")
    truth = np.zeros((len(paths), len(bundle.class_names)), dtype=np.int64)
    columns = [bundle.class_names.index(name) for name in class_names]
    truth[:, columns] = np.asarray(targets, dtype=np.int64).reshape(len(paths), len(class_names))
    scores = bundle_scores(bundle, paths, batch_size=batch_size)
    return {**multilabel_metrics(truth, scores, bundle.thresholds, bundle.class_names), "num_images": len(paths)}
