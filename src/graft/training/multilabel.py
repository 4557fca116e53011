"""Multi-label classification as a `Task`: a sigmoid per label, binary cross-entropy, mAP.

Labels are multi-hot rows (N, C). The loss is binary cross-entropy with logits (`--multilabel-loss
bce`; with `--class-weighting balanced` each label's positives weigh its negatives-per-positive,
so a rare label counts as much as a common one) or timm's asymmetric loss (`asymmetric`, Ridnik et
al. 2021: easy negatives down-weighted, for many labels that are mostly absent). The best epoch has
the highest validation macro mAP (threshold-free). After training, each label's threshold is
chosen on validation to maximise its F1 (`choose_thresholds`) and stored in the bundle.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from graft.config import TrainConfig
from graft.training.metrics import macro_average_precision, multilabel_metrics
from graft.training.task import CLASSIFICATION, Task

DEFAULT_THRESHOLD = 0.5


class BinaryCrossEntropy(nn.Module):
    """`BCEWithLogitsLoss` that takes integer multi-hot targets (the batches carry them as integers)."""

    def __init__(self, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.loss = nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(logits.float(), targets.float())


class AsymmetricLoss(nn.Module):
    """timm's `AsymmetricLossMultiLabel` (a sum over the batch) as a mean over the images, so that
    the learning rates tuned for cross-entropy keep their scale."""

    def __init__(self) -> None:
        super().__init__()
        from timm.loss import AsymmetricLossMultiLabel  # timm's loss package, loaded only for this loss

        self.loss = AsymmetricLossMultiLabel(gamma_neg=4, gamma_pos=0, clip=0.05)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(logits.float(), targets.float()) / max(1, len(targets))


class MultiLabelTask:
    """Multi-label classification: BCE (or asymmetric loss), macro mAP for the best epoch, a
    sigmoid above 0.5 for the prediction during training (the stored thresholds after it)."""

    name = "multilabel"
    # One binary regression per label, each with few positives, on features up to 16 000 wide: the
    # strength matters here (emoji task, grids of three stages: test mAP 0.802 at C=1, 0.818 at
    # the C=0.01 validation chose; of two stages: 0.805 and 0.815; `bench/head_strength.py`).
    l2_strengths = (0.01, 0.03, 0.1, 0.3, 1.0)

    def training_loss(self, labels: torch.Tensor, num_classes: int, config: TrainConfig) -> nn.Module:
        if config.multilabel_loss == "asymmetric":
            return AsymmetricLoss()
        return BinaryCrossEntropy(positive_weights(labels) if config.class_weighting == "balanced" else None)

    @torch.no_grad()
    def evaluate(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        if len(labels) == 0:
            return float("nan"), float("nan")
        loss = float(nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float()))
        return loss, macro_average_precision(labels.numpy(), logits.float().sigmoid().numpy())

    def hits(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Images whose whole label set is predicted right at 0.5 (subset accuracy's numerator)."""
        return (self.decode(logits) == labels).all(dim=1).sum()

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits > 0).long()  # sigmoid(logit) > 0.5


MULTILABEL = MultiLabelTask()


def task_named(name: str) -> Task:
    """The `Task` of a dataset's `task` ("classification" or "multilabel")."""
    return MULTILABEL if name == "multilabel" else CLASSIFICATION


def positive_weights(labels: torch.Tensor) -> torch.Tensor:
    """Each label's negatives per positive (`BCEWithLogitsLoss(pos_weight=)`), at most 100."""
    positives = labels.float().sum(0).clamp(min=1)
    return ((len(labels) - positives) / positives).clamp(min=1e-3, max=100)


def choose_thresholds(scores: np.ndarray, targets: np.ndarray) -> list[float]:
    """Per label, the score threshold that maximises its F1 on (scores, targets) (N, C): the midpoint
    between the lowest score kept and the next one below, so that it generalises a little; 0.5 for a
    label without a positive."""
    from sklearn.metrics import precision_recall_curve  # scikit-learn loads only when thresholds are chosen

    thresholds = []
    for label in range(targets.shape[1]):
        truth, score = targets[:, label], scores[:, label]
        if truth.sum() == 0:
            thresholds.append(DEFAULT_THRESHOLD)
            continue
        precision, recall, cuts = precision_recall_curve(truth, score)
        f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision), where=(precision + recall) > 0)[:-1]
        best = float(cuts[int(np.argmax(f1))])
        below = score[score < best]
        thresholds.append(round((best + float(below.max())) / 2 if len(below) else best, 6))
    return thresholds


def validation_metrics(targets: Sequence[Sequence[int]], logits: torch.Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """`multilabel_metrics` of the validation logits at thresholds chosen on them (`choose_thresholds`)."""
    scores = logits.float().sigmoid().numpy()
    truth = np.asarray(targets, dtype=np.int64).reshape(scores.shape)
    return multilabel_metrics(truth, scores, choose_thresholds(scores, truth), class_names)


def validation_rows(paths: Sequence[str], targets: Sequence[Sequence[int]], logits: torch.Tensor,
                    class_names: Sequence[str], thresholds: Sequence[float]) -> list[dict[str, Any]]:
    """One row per validation image: path, true labels, predicted labels, and every label's score."""
    scores = logits.float().sigmoid().tolist()
    return [{
        "path": path,
        "true": [name for name, on in zip(class_names, truth) if on],
        "labels": [name for name, score, cut in zip(class_names, row, thresholds) if score >= cut],
        "scores": {name: round(score, 6) for name, score in zip(class_names, row)},
    } for path, truth, row in zip(paths, targets, scores)]
