"""The training loop: one explicit function, the same for every strategy.

`fit` runs epochs of a caller-supplied `train_epoch` and `validate`, keeps the best epoch's
weights (by validation accuracy, then loss), stops early when validation stops improving, and
reports each epoch to `on_epoch` (history, progress, checkpoints). What an epoch *is* (a pass over
cached features, or over images with some stages thawed) is the strategy's business.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from graft.errors import TrainingError
from graft.speed.numerics import autocast, train_depthwise_in_fp32
from graft.training.task import CLASSIFICATION

if TYPE_CHECKING:
    from graft.speed.compiling import TrainingCompiler
    from graft.training.task import Task


@dataclass
class EpochRecord:
    """One line of history.jsonl."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: list[float]
    seconds: float
    stage_thawed: str | None = None
    trainable_stages: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class FitResult:
    history: list[EpochRecord]
    best_epoch: int
    best_val_accuracy: float
    best_val_loss: float
    stopped_early: bool
    best_state: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    chose: dict[str, Any] = field(default_factory=dict)  # a choice made on validation besides the epoch (the L-BFGS head's C)


def warmup_cosine(total_steps: int, warmup_steps: int, floor: float = 0.01) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then cosine decay to `floor` at `total_steps`."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, *, epochs: int, steps_per_epoch: int, warmup_epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step schedule every strategy uses; it scales each group's own rate alike."""
    factor = warmup_cosine(epochs * steps_per_epoch, warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    """Backward, step, and advance the per-step schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()


def make_optimizer(groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    """AdamW over `groups`; on CUDA the fused kernel (one launch for every parameter's update)."""
    return torch.optim.AdamW(groups, fused=device.type == "cuda")


class TrainSteps:
    """The training step every image-training loop runs, and the epoch's running loss and accuracy.

    Batches move to the device without blocking (from pinned memory on CUDA) in channels_last;
    the forward runs under the run's autocast (on a CPU in bf16 with the trained depthwise
    convolutions in fp32: `numerics.train_depthwise_in_fp32`), the loss in float32. The sums
    stay on the device: reading a value back (`loss.item()`) after every step would make the host
    wait for the GPU each step instead of queueing the next one. `epoch_result()` reads them once.
    """

    def __init__(self, network: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 *, precision: str, device: torch.device, prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 compiler: "TrainingCompiler | None" = None, task: "Task | None" = None) -> None:

        self.network, self.loss_fn, self.optimizer, self.scheduler = network, loss_fn, optimizer, scheduler
        self.task = task or CLASSIFICATION  # what counts as a right prediction in the running score
        self.precision, self.device = precision, device
        self.prepare = prepare  # run on the device before the forward (uint8 batches: the normalisation)
        self.compiler = compiler  # decides when the step runs through torch.compile (graft.speed.compiling)
        if device.type == "cpu" and precision == "bf16":
            train_depthwise_in_fp32(network)  # oneDNN's bf16 depthwise backward is the slow one there
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), dtype=torch.long, device=self.device)
        self.count = 0

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One step on a batch; returns the batch's loss (a device tensor: reading it waits)."""
        inputs = inputs.to(self.device, non_blocking=True)
        if self.prepare is not None:
            inputs = self.prepare(inputs)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
        labels = labels.to(self.device, non_blocking=True)
        compiled = self.compiler.network_for(self.network, len(labels)) if self.compiler else None
        if compiled is not None:
            try:
                loss, logits = self._step(compiled, inputs, labels)
            except Exception as error:  # compiling is an optimisation: never fail the run for it
                assert self.compiler is not None
                self.compiler.failed(error)
                compiled = None
                loss, logits = self._step(self.network, inputs, labels)
        else:
            loss, logits = self._step(self.network, inputs, labels)
        if self.compiler:
            self.compiler.after_step(compiled is not None)
        with torch.no_grad():
            self.loss_sum += loss.detach() * len(labels)
            self.correct += self.task.hits(logits, labels)
        self.count += len(labels)
        return loss.detach().clone()  # a compiled step's CUDA graph overwrites its output at the next replay

    def _step(self, network: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(self.precision, self.device):
            logits = network(inputs)
        loss = self.loss_fn(logits.float(), labels)
        optimizer_step(loss, self.optimizer, self.scheduler)
        return loss, logits

    def epoch_result(self) -> tuple[float, float]:
        """(mean training loss, training accuracy) since the last call; starts a new epoch."""
        if self.compiler:
            self.compiler.epoch_ended()
        if self.count == 0:
            return float("nan"), float("nan")
        result = float(self.loss_sum) / self.count, int(self.correct) / self.count
        self._reset()
        return result


def view_batches(
    views: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch over cached inputs (views, N, ...): shuffled, each item from one random view."""
    count = views.shape[1]
    order = torch.randperm(count, generator=generator)
    view_of = torch.randint(views.shape[0], (count,), generator=generator)
    for start in range(0, count, batch_size):
        index = order[start : start + batch_size]
        yield views[view_of[index], index], labels[index]


def fit(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_epoch: Callable[[int], tuple[float, float]],
    validate: Callable[[], tuple[float, float]],
    epochs: int,
    patience: int | None,
    start_epoch: int = 0,
    history: list[EpochRecord] | None = None,
    best: tuple[int, float, float, dict[str, torch.Tensor]] | None = None,
    before_epoch: Callable[[int], str | None] | None = None,
    on_epoch: Callable[[EpochRecord, bool, "FitState"], None] | None = None,
) -> FitResult:
    """Train for up to `epochs` epochs; returns the history and the best epoch's state.

    `train_epoch(epoch)` → (train loss, train accuracy); `validate()` → (val loss, val accuracy).
    `before_epoch(epoch)` may change what trains (gradual unfreezing) and returns a note for the
    history. `on_epoch(record, improved, state)` is told after each epoch (history, checkpoints).
    `start_epoch`, `history` and `best` continue an interrupted run.
    An epoch whose training or validation loss is not finite (the weights diverged) raises
    `TrainingError` at once, before `on_epoch` hears of it.
    """
    history = list(history or [])
    best_epoch, best_acc, best_loss, best_state = best if best else (-1, -1.0, math.inf, {})
    stale = 0 if not history else (history[-1].epoch - best_epoch)
    stopped_early = False
    if history and patience is not None and stale >= patience:
        # A resumed run whose last epoch already triggered early stopping stops where it stopped.
        return FitResult(history, best_epoch, best_acc, best_loss, True, best_state)
    for epoch in range(start_epoch, epochs):
        note = before_epoch(epoch) if before_epoch else None
        started = time.perf_counter()
        train_loss, train_acc = train_epoch(epoch)
        val_loss, val_acc = validate()
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            # Before the epoch is recorded or checkpointed: what is on disk stays finite.
            raise TrainingError(divergence_message(epoch, epochs, train_loss, val_loss, optimizer))
        record = epoch_record(epoch, (train_loss, train_acc), (val_loss, val_acc), optimizer, time.perf_counter() - started, note)
        history.append(record)
        improved = (val_acc > best_acc + 1e-9) or (abs(val_acc - best_acc) <= 1e-9 and val_loss < best_loss)
        if improved:
            best_epoch, best_acc, best_loss = epoch, val_acc, val_loss
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            stale = 0
        else:
            stale += 1
        state = FitState(history, best_epoch, best_acc, best_loss, best_state)
        if on_epoch:
            on_epoch(record, improved, state)
        if patience is not None and stale >= patience:
            stopped_early = True
            break
    return FitResult(history, best_epoch, best_acc, best_loss, stopped_early, best_state)


def epoch_record(
    epoch: int, train: tuple[float, float], val: tuple[float, float], optimizer: torch.optim.Optimizer, seconds: float, note: str | None
) -> EpochRecord:
    """One line of `history.jsonl`: (loss, accuracy) of training and validation, rates, seconds."""
    return EpochRecord(
        epoch=epoch,
        train_loss=round(float(train[0]), 6),
        train_accuracy=round(float(train[1]), 6),
        val_loss=round(float(val[0]), 6),
        val_accuracy=round(float(val[1]), 6),
        lr=[float(f"{g['lr']:.3g}") for g in optimizer.param_groups],
        seconds=round(seconds, 3),
        stage_thawed=note,
    )


def divergence_message(epoch: int, epochs: int, train_loss: float, val_loss: float, optimizer: torch.optim.Optimizer) -> str:
    """Why training stopped at a non-finite loss, with the rates that took too large steps."""
    peak_lr = max(group.get("initial_lr", group["lr"]) for group in optimizer.param_groups)
    weight_decay = max(group.get("weight_decay", 0.0) for group in optimizer.param_groups)
    return (
        f"training diverged in epoch {epoch + 1} of {epochs}: the training loss is {train_loss:g} and the "
        f"validation loss {val_loss:g}, the weights are no longer finite numbers. Its steps were too large: "
        f"rerun (without --resume, which keeps a run's options) with a lower --lr (this run's peak rate was {peak_lr:g}) or a lower --weight-decay (was {weight_decay:g}); "
        "no bundle and no metrics were written"
    )


@dataclass
class FitState:
    """What `fit` knows after an epoch (handed to `on_epoch` for checkpoints)."""

    history: list[EpochRecord]
    best_epoch: int
    best_val_accuracy: float
    best_val_loss: float
    best_state: dict[str, torch.Tensor]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; CPU runs with the same seed give the same result."""
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate_logits(logits: torch.Tensor, labels: torch.Tensor, loss_fn: nn.Module) -> tuple[float, float]:
    """(mean loss, accuracy) of logits against labels."""
    if len(labels) == 0:
        return float("nan"), float("nan")
    loss = float(loss_fn(logits, labels))
    accuracy = float((logits.argmax(1) == labels).float().mean())
    return loss, accuracy
