"""`feature-extract` (alias `linear-probe`): frozen backbone, features cached, only the head trains.

The backbone runs once per image (in eval mode, so BatchNorm statistics never move) and its
pooled features are cached on disk; the head then trains on the cached features, which makes an
epoch cost a matrix multiply instead of a backbone pass. `augment_views=K` caches K augmented
views of each training image as well, and every epoch draws one view per image.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from graft.checkpoint import start_phase
from graft.config import TrainConfig
from graft.features import ExtractionStats, extract_features
from graft.heads import make_head
from graft.loop import evaluate_logits, fit, optimizer_step, view_batches, warmup_cosine_schedule
from graft.model import GraftModel
from graft.numerics import intra_op_threads
from graft.stages import Stage
from graft.strategies.base import AuditRow, TrainContext, TrainOutcome, count_params, has_batchnorm


class FeatureExtract:
    name = "feature-extract"
    default_epochs = 100
    default_lr = 1e-3
    default_patience = 25

    def audit(self, backbone: nn.Module, stages: list[Stage], head: nn.Module, config: TrainConfig) -> list[AuditRow]:
        rows = [
            AuditRow(stage.name, 0, stage.num_params, None, "eval" if has_batchnorm(backbone, stage) else "-")
            for stage in stages
        ]
        rows.append(AuditRow("head", count_params(head), count_params(head), config.lr or self.default_lr, "-"))
        return rows

    def train(self, context: TrainContext) -> TrainOutcome:
        backbone = context.backbone
        freeze(backbone.model)
        stats = ExtractionStats()
        train_views = self.cached_features(context, stats)
        val_features = self._features(context, context.dataset.val.paths, context.dataset.val.digests, "none", 0, "validation", stats)
        context.reporter.say(
            f"features: {stats.computed} computed, {stats.from_cache} from the cache "
            f"({context.cache.folder if context.cache else 'no cache'}){'; backbone compiled' if stats.compiled else ''}"
        )
        head, result, val_logits = train_head(
            train_views,
            torch.tensor(context.dataset.train.labels),
            val_features,
            torch.tensor(context.dataset.val.labels),
            context=context,
            default_epochs=self.default_epochs,
            default_lr=self.default_lr,
            default_patience=self.default_patience,
        )
        model = GraftModel(backbone.model, head).eval()
        return TrainOutcome(model=model, fit=result, val_logits=val_logits, notes={"features_computed": stats.computed, "features_from_cache": stats.from_cache,
                                                                                          "backbone_compiled": stats.compiled})

    def cached_features(self, context: TrainContext, stats: ExtractionStats) -> torch.Tensor:
        """Training features (views, N, D): view 0 plain, views 1..K augmented."""
        train = context.dataset.train
        views = [self._features(context, train.paths, train.digests, "none", 0, "training", stats)]
        for view in range(1, (context.config.augment_views or 0) + 1):
            views.append(
                self._features(context, train.paths, train.digests, context.config.augment, view, f"augmented view {view}", stats)
            )
        return torch.stack(views)

    def _features(self, context: TrainContext, paths, digests, augment: str, view: int, what: str, stats: ExtractionStats) -> torch.Tensor:
        with context.reporter.progress(f"features ({what})", len(paths)) as advance:
            return extract_features(
                context.backbone, paths, digests, cache=context.cache, precision=context.precision,
                device=context.device, augment=augment, view=view, seed=context.config.seed,
                progress=advance, stats=stats, compile=context.compile_backbone,
                tap=context.tap if augment == "none" else None,
            )


def freeze(module: nn.Module) -> None:
    """No gradients and eval mode: a frozen module's weights and BatchNorm buffers never change."""
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)


def class_weights(labels: torch.Tensor, num_classes: int, mode: str) -> torch.Tensor | None:
    """Inverse-frequency weights for "balanced", None for "none"."""
    if mode == "none":
        return None
    counts = torch.bincount(labels, minlength=num_classes).float().clamp(min=1)
    return counts.sum() / (num_classes * counts)


def train_head(
    train_views: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    context: TrainContext,
    default_epochs: int,
    default_lr: float,
    default_patience: int,
) -> tuple[nn.Module, "FitResult", torch.Tensor]:  # noqa: F821
    """Train a new head on cached features; returns (head at its best epoch, fit result, val logits)."""
    config = context.config
    head = make_head(context.head_spec)
    epochs = config.epochs or default_epochs
    lr = config.lr or default_lr
    patience = config.patience or default_patience
    count = train_views.shape[1]
    batch_size = min(config.batch_size, count)
    steps_per_epoch = math.ceil(count / batch_size)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=config.weight_decay)
    scheduler = warmup_cosine_schedule(optimizer, epochs=epochs, steps_per_epoch=steps_per_epoch, warmup_epochs=config.warmup_epochs)
    weights = class_weights(train_labels, context.head_spec.num_classes, config.class_weighting)
    train_loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing)
    val_loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(config.seed)

    def train_epoch(epoch: int) -> tuple[float, float]:
        head.train()
        total_loss, correct = 0.0, 0
        for inputs, targets in view_batches(train_views, train_labels, batch_size, generator):
            logits = head(inputs)
            loss = train_loss_fn(logits, targets)
            optimizer_step(loss, optimizer, scheduler)
            total_loss += loss.item() * len(targets)
            correct += int((logits.argmax(1) == targets).sum())
        return total_loss / count, correct / count

    @torch.no_grad()
    def validate() -> tuple[float, float]:
        head.eval()
        return evaluate_logits(head(val_features), val_labels, val_loss_fn)

    checkpoint = start_phase(context, "head", model=head, optimizer=optimizer, scheduler=scheduler, generators={"batches": generator})
    with context.reporter.progress("head epochs", epochs) as advance:
        advance(checkpoint.start_epoch)

        def on_epoch(record, improved, state) -> None:
            context.on_epoch(state.history)
            checkpoint.save(state)
            advance(1, status=f"loss {record.train_loss:.3f} val acc {record.val_accuracy:.3f}")

        # Head epochs are tiny ops where OpenMP's thread wake-ups cost more than they save.
        with intra_op_threads(1):
            result = fit(
                model=head, optimizer=optimizer, train_epoch=train_epoch, validate=validate,
                epochs=epochs, patience=patience, on_epoch=on_epoch, **checkpoint.fit_kwargs,
            )
    head.load_state_dict(result.best_state)
    head.eval()
    with torch.no_grad():
        val_logits = head(val_features)
    return head, result, val_logits
