"""One training phase: the optimisation every strategy runs, given only what differs.

A `Phase` names what trains (`model`, whose weights are checkpointed and restored at the best
epoch, with its `optimizer` and per-step `scheduler`), the batches of an epoch (cached features,
cached prefix outputs or images), the step that trains on one batch, how validation logits are
computed, the `Task` (loss, best-epoch score, predictions), the epochs and patience, and its events:
`before_epoch` (thaw stages, set train mode; its note goes in the history), `batch_status` (the
progress line after a batch), `saved_extra`/`restore_extra` (what the checkpoint keeps beside the
weights). `run_phase` does the rest the same way for all: the checkpoint phase and resume, the
progress bar, `graft.training.loop.fit`, the best epoch's weights restored, the final validation logits.

    feature-extract   one phase "head" (HeadSteps over cached features)
    partial, gradual… one phase "finetune" (TrainSteps over prefix outputs or images)
    lp-ft             "head" (the probe), then "finetune" from the probe's head
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import nn

from graft.speed.numerics import intra_op_threads
from graft.training.checkpoint import start_phase
from graft.training.loop import FitResult, fit, optimizer_step
from graft.training.task import CLASSIFICATION, Task


class Steps(Protocol):
    """Trains on one batch per call and keeps the epoch's running loss and score."""

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ...

    def epoch_result(self) -> tuple[float, float]:
        ...


@dataclass
class Phase:
    """Everything that differs between two optimisation phases (see the module's docstring)."""

    name: str  # the checkpoint's phase ("head", "finetune")
    title: str  # the progress bar's label
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: torch.Generator  # draws the batches' order; checkpointed
    epochs: int
    patience: int
    batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]  # epoch -> its batches
    steps: Callable[[int], Steps]  # epochs left to train -> the step
    predict: Callable[[], torch.Tensor]  # the validation logits (the model in eval mode)
    val_labels: torch.Tensor
    task: Task = CLASSIFICATION
    before_epoch: Callable[[int], str | None] | None = None
    batch_status: Callable[[torch.Tensor], str | None] | None = None
    saved_extra: Callable[[], dict] | None = None
    restore_extra: Callable[[dict], None] | None = None
    # The model is already fitted (lp-ft's probe head): it competes as epoch -1 with the epochs.
    start_is_candidate: bool = False
    threads: int | None = None  # intra-op threads while the epochs run (None: torch's setting)


@dataclass
class PhaseResult:
    """The phase's history and best epoch, the best model's validation logits, and notes for metrics.json."""

    fit: FitResult
    val_logits: torch.Tensor
    notes: dict[str, object] = field(default_factory=dict)


def run_phase(phase: Phase, context: Any) -> PhaseResult:
    """Run `phase` to its end (or early stop) and leave `phase.model` at its best epoch, in eval
    mode with no parameter requiring gradients. `context` is the strategy's `TrainContext`."""
    checkpoint = start_phase(context, phase.name, model=phase.model, optimizer=phase.optimizer,
                             scheduler=phase.scheduler, generators={"batches": phase.generator})
    if phase.restore_extra is not None:
        phase.restore_extra(checkpoint.extra)
    steps = phase.steps(phase.epochs - checkpoint.start_epoch)

    def validate() -> tuple[float, float]:
        return phase.task.evaluate(phase.predict(), phase.val_labels)

    with context.reporter.progress(phase.title, phase.epochs) as advance:
        advance(checkpoint.start_epoch)

        def train_epoch(epoch: int) -> tuple[float, float]:
            for inputs, labels in phase.batches(epoch):
                loss = steps(inputs, labels)
                if phase.batch_status is not None:
                    advance(0, status=phase.batch_status(loss))
            return steps.epoch_result()

        def on_epoch(record, improved, state) -> None:
            context.on_epoch(state.history)
            checkpoint.save(state, phase.saved_extra() if phase.saved_extra else None)
            advance(1, status=f"loss {record.train_loss:.3f} val acc {record.val_accuracy:.3f}")

        resumed, notes = starting_point(phase, validate, checkpoint.fit_kwargs)
        with intra_op_threads(phase.threads) if phase.threads else contextlib.nullcontext():
            result = fit(model=phase.model, optimizer=phase.optimizer, train_epoch=train_epoch, validate=validate,
                         epochs=phase.epochs, patience=phase.patience, before_epoch=phase.before_epoch,
                         on_epoch=on_epoch, **resumed)
    phase.model.load_state_dict(result.best_state)
    phase.model.eval()
    for parameter in phase.model.parameters():
        parameter.requires_grad_(False)
    if getattr(steps, "compiler", None) is not None:
        notes["training_compile"] = steps.compiler.decision.to_dict()
    return PhaseResult(result, phase.predict(), notes)


def starting_point(phase: Any, validate: Callable[[], tuple[float, float]], resumed: dict) -> tuple[dict, dict]:
    """`fit`'s keyword arguments and notes: a resumed run's, or for a phase whose starting model is
    already fitted (`start_is_candidate`), that model as epoch -1 with its validation score, so
    that the best epoch is chosen among it too. Fine-tuning that never beats the probe it started
    from on validation gives the probe back instead of a worse model (one validation pass)."""
    if resumed or not phase.start_is_candidate:
        return resumed, {}
    val_loss, val_accuracy = validate()
    best_state = {k: v.detach().clone() for k, v in phase.model.state_dict().items()}
    # The run's metrics show what fine-tuning had to beat.
    return {"best": (-1, val_accuracy, val_loss, best_state)}, {"start_val_accuracy": round(val_accuracy, 6)}


class HeadSteps:
    """The training step of a head on cached features: in float32 on the CPU, without autocast,
    the running sums read back after each step (the ops are tiny; nothing is queued)."""

    def __init__(self, head: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 task: Task = CLASSIFICATION) -> None:
        self.head, self.loss_fn, self.optimizer, self.scheduler, self.task = head, loss_fn, optimizer, scheduler, task
        self.loss_sum, self.correct, self.count = 0.0, 0, 0

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.head(inputs)
        loss = self.loss_fn(logits, labels)
        optimizer_step(loss, self.optimizer, self.scheduler)
        self.loss_sum += loss.item() * len(labels)
        self.correct += int(self.task.hits(logits, labels))
        self.count += len(labels)
        return loss.detach()

    def epoch_result(self) -> tuple[float, float]:
        """(mean training loss, training accuracy) since the last call; starts a new epoch."""
        result = self.loss_sum / self.count, self.correct / self.count
        self.loss_sum, self.correct, self.count = 0.0, 0, 0
        return result
