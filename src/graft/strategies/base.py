"""What every strategy shares: the context it gets, what it returns, and its audit."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import torch
from torch import nn

from graft.config import TrainConfig
from graft.console import Reporter
from graft.input.data import Dataset
from graft.input.preprocessing import Preprocessing
from graft.models.backbones import Backbone
from graft.models.heads import HeadSpec
from graft.models.model import GraftModel
from graft.models.stages import Stage
from graft.training import distributed
from graft.training.features import FeatureCache, Tap, default_cache_dir
from graft.training.loop import EpochRecord, FitResult
from graft.training.multilabel import task_named
from graft.training.task import Task

if TYPE_CHECKING:
    from graft.training.checkpoint import Checkpointer


@dataclass
class TrainContext:
    """Everything a strategy needs to train, prepared by `graft.train`."""

    config: TrainConfig
    dataset: Dataset
    backbone: Backbone
    stages: list[Stage]
    head_spec: HeadSpec
    device: torch.device
    precision: str
    cache: FeatureCache | None
    reporter: Reporter
    on_epoch: Callable[[list[EpochRecord]], None]
    # Per-epoch checkpoints of the run (and what to resume from); None: no checkpoints.
    checkpoint: "Checkpointer | None" = None
    compile_backbone: bool = False  # torch.compile the frozen backbone's forward for extraction
    # Where the frozen prefix a strategy will train on ends, and its outputs kept from the passes
    # of the whole backbone over the plain view (`with_prefix_tap`); None: nothing is kept.
    tap: Tap | None = None

    @property
    def task(self) -> Task:
        """What the labels ask for: single-label (softmax) or multi-label (`graft.training.multilabel`)."""
        return task_named(self.dataset.task)


def with_prefix_tap(context: TrainContext, module_name: str) -> TrainContext:
    """`context` with a `Tap` on `module_name`: every full pass over the plain view of the images
    then keeps the frozen prefix's outputs too, and training on cached prefix outputs does not run
    the prefix over those images again. A tap already there on the same module is kept (with what
    it holds). No tap without a feature cache (the outputs are handed over through it), under
    torchrun (each rank sees its share) or with a compiled backbone (hooks are not compiled)."""
    from dataclasses import replace


    if context.cache is None or distributed.active() or context.compile_backbone:
        return context
    if context.tap is not None and context.tap.module_name == module_name:
        return context
    return replace(context, tap=Tap(module_name))


@dataclass
class TrainOutcome:
    """A trained model, its training history, and its logits on the validation images."""

    model: GraftModel
    fit: FitResult
    val_logits: torch.Tensor
    notes: dict[str, object] = field(default_factory=dict)
    adapters: dict[str, object] | None = None  # recorded in the bundle so that it reloads them
    preprocessing: Preprocessing | None = None  # set when the strategy chose another view (auto's framing)
    pooling: str | None = None  # set when the strategy chose another pooling (auto), with its head:
    head_spec: HeadSpec | None = None


@dataclass(frozen=True)
class AuditRow:
    """One line of the trainability audit, printed before training."""

    stage: str
    trainable_params: int
    total_params: int
    lr: float | None
    bn_mode: str  # "eval" (statistics frozen), "train", or "-" when the stage has no BatchNorm


class Strategy(Protocol):
    name: str
    default_epochs: int
    default_lr: float
    default_patience: int

    def audit(self, backbone: nn.Module, stages: list[Stage], head: nn.Module, config: TrainConfig) -> list[AuditRow]:
        ...

    def train(self, context: TrainContext) -> TrainOutcome:
        ...


# Below this many training images per class (median), BatchNorm statistics stay frozen even in the
# stages that train. Measured on 20-shot Fashion-MNIST with the lp-ft recipe (probe head, whole
# network trainable, discriminative rates, strong augmentation, whole frame), validation accuracy
# after 6 of 12 epochs: 0.67 with statistics updated from batches of 32 augmented crops, 0.80 with
# them frozen; graft's lp-ft with them frozen then scored 0.811 on the test split.
BN_STATS_FROZEN_BELOW = 100


def resolve_bn_stats(bn_stats: str, images_per_class: float) -> str:
    """`--bn-stats auto` → "frozen" for small data, "update" (timm's usual fine-tuning) otherwise."""
    if bn_stats != "auto":
        return bn_stats
    return "frozen" if images_per_class < BN_STATS_FROZEN_BELOW else "update"


def has_batchnorm(backbone: nn.Module, stage: Stage) -> bool:
    modules = dict(backbone.named_modules())
    for name in stage.module_names:
        for sub in modules[name].modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                return True
    return False


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def cache_dir_of(config: TrainConfig) -> Path | None:

    return Path(config.cache_dir) if config.cache_dir else default_cache_dir()
