"""Classification metrics with the keys of design.md (`accuracy`, `macro_f1`, `per_class`, ...)."""

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
