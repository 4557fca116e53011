"""Classification metrics with the keys of design.md (`accuracy`, `macro_f1`, `per_class`, ...), single- and multi-label."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix.

    The confusion matrix has one row per true class and one column per predicted class, both in
    `class_names` order. A class with no prediction has precision 0 (as scikit-learn's
    `zero_division=0`).

    `macro_f1` is scikit-learn's `f1_score(average="macro")`: the mean F1 over the classes that
    occur in `y_true` or `y_pred`, listed in `macro_f1_classes`. On a folder holding only some of
    a bundle's classes, a class that is predicted but absent counts (with F1 0: every prediction
    of it is wrong), a class neither present nor predicted does not (nothing measured it).
    `per_class` lists every class; those outside the average have support 0 and no predictions.
    """
    true = np.asarray(y_true, dtype=np.int64)
    pred = np.asarray(y_pred, dtype=np.int64)
    k = len(class_names)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (true, pred), 1)
    tp = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(0).astype(np.float64)
    support = confusion.sum(1).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    averaged = (support > 0) | (predicted > 0)
    return {
        "accuracy": float(tp.sum() / max(1, len(true))),
        "macro_f1": float(f1[averaged].mean()) if averaged.any() else 0.0,
        "macro_f1_classes": [name for name, used in zip(class_names, averaged) if used],
        "per_class": {
            name: {
                "precision": round(float(precision[i]), 6),
                "recall": round(float(recall[i]), 6),
                "f1": round(float(f1[i]), 6),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion.tolist(),
        "class_names": list(class_names),
    }


def macro_average_precision(targets: np.ndarray, scores: np.ndarray) -> float:
    """The mean over labels with at least one positive of scikit-learn's `average_precision_score`
    (targets and scores (N, C)); nan when no label has a positive."""
    from sklearn.metrics import average_precision_score  # scikit-learn loads only for multi-label metrics

    present = np.asarray(targets).sum(0) > 0
    if not present.any():
        return float("nan")
    return float(average_precision_score(np.asarray(targets)[:, present], np.asarray(scores)[:, present], average="macro"))


def label_ranking_precision(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Each image's label-ranking average precision (targets and scores (N, C); returns (N,)): over
    its true labels, the share of true ones among the labels scoring at least as high. An image
    with no true label, or with every label true, scores 1. The mean is scikit-learn's
    `label_ranking_average_precision_score`; this keeps the per-image terms it averages, which
    paired comparisons of two models on the same images need."""
    truth = np.asarray(targets).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    result = np.ones(len(truth))
    chunk = max(1, 2**24 // max(1, truth.shape[1] ** 2))  # rows per block: (rows, C, C) booleans stay small
    for start in range(0, len(truth), chunk):
        true, score = truth[start:start + chunk], scores[start:start + chunk]
        at_least = score[:, None, :] >= score[:, :, None]  # [i, j, k]: label k scores at least label j
        rank = at_least.sum(2)  # ties count as above, as scikit-learn ranks them ("max")
        true_rank = (at_least & true[:, None, :]).sum(2)
        relevant = true.sum(1)
        precision = np.where(true, true_rank / rank, 0.0).sum(1) / np.maximum(relevant, 1)
        ranked = (relevant > 0) & (relevant < truth.shape[1])
        result[start:start + chunk] = np.where(ranked, precision, 1.0)
    return result


def multilabel_metrics(targets: Sequence[Sequence[int]], scores: np.ndarray, thresholds: Sequence[float],
                       class_names: Sequence[str]) -> dict[str, Any]:
    """Multi-label scores: macro mAP (`map`, over the labels with a positive), micro and macro F1 at
    the per-label `thresholds`, subset `accuracy` (the whole label set right), and per label its
    precision, recall, F1, AP (null without a positive), support and threshold.

    `macro_f1` averages the labels with a positive or a prediction (scikit-learn's `f1_score`
    with `zero_division=0` over those labels), listed in `macro_f1_classes`.
    """
    from sklearn.metrics import average_precision_score, precision_recall_fscore_support  # loads only for multi-label metrics

    truth = np.asarray(targets, dtype=np.int64).reshape(-1, len(class_names))
    scores = np.asarray(scores, dtype=np.float64).reshape(truth.shape)
    predicted = (scores >= np.asarray(thresholds)[None, :]).astype(np.int64)
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, average=None, zero_division=0)
    _, _, micro_f1, _ = precision_recall_fscore_support(truth, predicted, average="micro", zero_division=0)
    averaged = (truth.sum(0) > 0) | (predicted.sum(0) > 0)
    ap = [float(average_precision_score(truth[:, i], scores[:, i])) if truth[:, i].any() else None for i in range(truth.shape[1])]
    return {
        "task": "multilabel",
        "map": macro_average_precision(truth, scores),
        "micro_f1": float(micro_f1),
        "macro_f1": float(f1[averaged].mean()) if averaged.any() else 0.0,
        "macro_f1_classes": [name for name, used in zip(class_names, averaged) if used],
        "accuracy": float((predicted == truth).all(1).mean()) if len(truth) else 0.0,
        "per_class": {
            name: {
                "precision": round(float(precision[i]), 6), "recall": round(float(recall[i]), 6), "f1": round(float(f1[i]), 6),
                "ap": None if ap[i] is None else round(ap[i], 6), "support": int(support[i]), "threshold": float(thresholds[i]),
            }
            for i, name in enumerate(class_names)
        },
        "class_names": list(class_names),
    }
