"""graft.training: one optimisation phase for every strategy, with the task as a parameter."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from graft.console import Reporter
from graft.training import CLASSIFICATION, HeadSteps, Phase, run_phase
from graft.training.loop import view_batches, warmup_cosine_schedule


class MultiLabel:
    """Another kind of task through the same phase: sigmoid outputs, binary cross-entropy, the
    fraction of right label decisions as the best-epoch score, a 0.5 threshold as the decoder."""

    name = "multi-label"

    def training_loss(self, labels, num_classes, config):
        return nn.BCEWithLogitsLoss()

    @torch.no_grad()
    def evaluate(self, logits, labels):
        loss = float(nn.functional.binary_cross_entropy_with_logits(logits, labels))
        return loss, float((self.decode(logits) == labels.bool()).float().mean())

    def hits(self, logits, labels):
        return (self.decode(logits) == labels.bool()).all(1).sum()

    def decode(self, logits):
        return logits > 0


def _phase(task, inputs: torch.Tensor, targets: torch.Tensor, epochs: int) -> tuple[Phase, nn.Module]:
    torch.manual_seed(0)
    head = nn.Linear(inputs.shape[1], targets.shape[1] if targets.ndim == 2 else int(targets.max()) + 1)
    optimizer = torch.optim.AdamW(head.parameters(), lr=0.05)
    scheduler = warmup_cosine_schedule(optimizer, epochs=epochs, steps_per_epoch=2, warmup_epochs=0)
    generator = torch.Generator().manual_seed(0)
    loss_fn = task.training_loss(targets, head.out_features, SimpleNamespace(class_weighting="none", label_smoothing=0.0))

    @torch.no_grad()
    def predict() -> torch.Tensor:
        head.eval()
        return head(inputs)

    phase = Phase(
        name="head", title="head epochs", model=head, optimizer=optimizer, scheduler=scheduler, generator=generator,
        epochs=epochs, patience=epochs, batches=lambda epoch: view_batches(inputs[None], targets, 8, generator),
        steps=lambda left: HeadSteps(head, loss_fn, optimizer, scheduler, task), predict=predict, val_labels=targets,
        task=task, before_epoch=lambda epoch: None,
    )
    return phase, head


def _context(histories: list) -> SimpleNamespace:
    return SimpleNamespace(reporter=Reporter(verbose=False), on_epoch=histories.append, checkpoint=None)


def test_a_second_kind_of_task_trains_through_the_same_phase() -> None:
    """A multi-label task (sigmoid, BCE, its own score and decoder) needs no loop of its own: the
    phase trains with its loss, picks the best epoch by its score and returns its logits."""
    inputs = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    targets = torch.stack([inputs[:, 0] > 0, inputs[:, 1] > 0, inputs[:, 0] + inputs[:, 1] > 0], 1).float()
    histories: list = []
    phase, head = _phase(MultiLabel(), inputs, targets, epochs=6)
    result = run_phase(phase, _context(histories))
    ranked = sorted(result.fit.history, key=lambda record: (-record.val_accuracy, record.val_loss))
    assert len(histories) == 6 and result.fit.best_epoch == ranked[0].epoch  # by the task's score, then loss
    assert ranked[0].val_accuracy > 0.8  # the labels are linear in the inputs: BCE learns them
    assert torch.equal(result.val_logits, head(inputs).detach()) and result.val_logits.shape == (16, 3)
    assert not any(p.requires_grad for p in head.parameters()) and not head.training


def test_single_label_classification_is_the_default_task() -> None:
    inputs = torch.randn(16, 4, generator=torch.Generator().manual_seed(2))
    targets = (inputs[:, 0] > 0).long()
    phase, _ = _phase(CLASSIFICATION, inputs, targets, epochs=4)
    assert phase.task is CLASSIFICATION
    result = run_phase(phase, _context([]))
    best = result.fit.history[result.fit.best_epoch]
    assert best.val_accuracy == round(CLASSIFICATION.evaluate(result.val_logits, targets)[1], 6)
    assert torch.equal(CLASSIFICATION.decode(result.val_logits), result.val_logits.argmax(1))
