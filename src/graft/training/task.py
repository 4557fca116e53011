"""What a training phase optimises and how its logits are read: the task.

A `Task` carries the three things that change with the kind of labels, so that one training loop
(`graft.training.phase`) serves every kind: the training loss, the validation score that picks the
best epoch, and how logits become predictions. Single-label classification (softmax,
cross-entropy, accuracy, argmax) is `ClassificationTask`; another kind (multi-label: sigmoid,
binary cross-entropy, mAP, a threshold) is another implementation of the same four methods.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from graft.config import TrainConfig


class Task(Protocol):
    name: str
    # The L2 strengths C (scikit-learn's `LogisticRegression(C=...)`) an L-BFGS head on cached
    # features is solved at; the one that scores best on validation is kept.
    l2_strengths: tuple[float, ...]

    def training_loss(self, labels: torch.Tensor, num_classes: int, config: TrainConfig) -> nn.Module:
        """The loss the optimiser minimises, given the training labels and the run's options."""
        ...

    def evaluate(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        """(validation loss, validation score): the best epoch has the highest score, then the lowest loss."""
        ...

    def hits(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """How many of a training batch's predictions are right (a tensor on the logits' device)."""
        ...

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """The predictions the logits stand for."""
        ...


class ClassificationTask:
    """Single-label classification: cross-entropy (class weights and label smoothing from the
    run's options), accuracy for the best epoch, argmax for the prediction."""

    name = "classification"
    # scikit-learn's default. From 0.01 to 1, C moved the grid-3 head's test accuracy by 0.3 points
    # on 20-shot and 0.6 on 100-shot Fashion-MNIST, and C=1 scored the best validation accuracy at
    # both (`bench/head_strength.py`, docs/benchmarks.md).
    l2_strengths = (1.0,)

    def training_loss(self, labels: torch.Tensor, num_classes: int, config: TrainConfig) -> nn.Module:
        weights = class_weights(labels, num_classes, config.class_weighting)
        return nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing)

    @torch.no_grad()
    def evaluate(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        if len(labels) == 0:
            return float("nan"), float("nan")
        loss = float(nn.functional.cross_entropy(logits, labels))
        return loss, float((self.decode(logits) == labels).float().mean())

    def hits(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (self.decode(logits) == labels).sum()

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(1)


CLASSIFICATION = ClassificationTask()


def class_weights(labels: torch.Tensor, num_classes: int, mode: str) -> torch.Tensor | None:
    """Inverse-frequency weights for "balanced", None for "none"."""
    if mode == "none":
        return None
    counts = torch.bincount(labels, minlength=num_classes).float().clamp(min=1)
    return counts.sum() / (num_classes * counts)
