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

from graft.config import TrainConfig
from graft.errors import ConfigError
from graft.models.heads import make_head
from graft.models.model import GraftModel
from graft.models.pooling import pooling_of
from graft.models.stages import Stage
from graft.speed.numerics import intra_op_threads
from graft.strategies.base import AuditRow, TrainContext, TrainOutcome, count_params, has_batchnorm
from graft.training import HeadSteps, Phase, class_weights, run_phase
from graft.training.features import ExtractionStats, extract_features
from graft.training.loop import EpochRecord, FitResult, view_batches, warmup_cosine_schedule
from graft.training.multilabel import positive_weights


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
        # A head that L-BFGS solves has no learning rate (`head_solver`).
        solver = head_solver(config, pooling_of(backbone))
        rows.append(AuditRow("head" if solver == "adamw" else "head (L-BFGS)", count_params(head), count_params(head),
                             config.lr or self.default_lr if solver == "adamw" else None, "-"))
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
        notes = {"features_computed": stats.computed, "features_from_cache": stats.from_cache, "backbone_compiled": stats.compiled}
        if result.chose:  # the L-BFGS head's C and each C's validation score
            notes["head_l2"] = result.chose
        return TrainOutcome(model=model, fit=result, val_logits=val_logits, notes=notes)

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
    """Train a new head on cached features; returns (head at its best epoch, fit result, val logits).

    The solver is `head_solver(config, pooling)`: epochs of AdamW with early stopping on validation
    (`head_phase`), or, for a linear head on grid-pooled features, L2-regularised logistic
    regression solved by L-BFGS (`fit_logistic_regression`).
    """
    head = make_head(context.head_spec)
    if head_solver(context.config, context.backbone.pooling) == "lbfgs":
        return fit_logistic_regression(head, train_views, train_labels, val_features, val_labels, context=context)
    phase = head_phase(head, (train_views, train_labels), (val_features, val_labels), context=context,
                       epochs=context.config.epochs or default_epochs, lr=context.config.lr or default_lr,
                       patience=context.config.patience or default_patience)
    outcome = run_phase(phase, context)
    return head, outcome.fit, outcome.val_logits


def head_phase(head: nn.Module, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], *,
               context: TrainContext, epochs: int, lr: float, patience: int) -> Phase:
    """The phase "head": AdamW on `head` over cached features (views, N, D), one random view of
    each image per epoch, validated on the plain features."""
    config = context.config
    (train_views, train_labels), (val_features, val_labels) = train, val
    batch_size = min(config.batch_size, train_views.shape[1])
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=config.weight_decay)
    scheduler = warmup_cosine_schedule(optimizer, epochs=epochs, steps_per_epoch=math.ceil(train_views.shape[1] / batch_size),
                                       warmup_epochs=config.warmup_epochs)
    loss_fn = context.task.training_loss(train_labels, context.head_spec.num_classes, config)
    generator = torch.Generator().manual_seed(config.seed)

    def before_epoch(epoch: int) -> None:
        head.train()

    @torch.no_grad()
    def predict() -> torch.Tensor:
        head.eval()
        return head(val_features)

    return Phase(
        name="head", title="head epochs", model=head, optimizer=optimizer, scheduler=scheduler, generator=generator,
        epochs=epochs, patience=patience,
        batches=lambda epoch: view_batches(train_views, train_labels, batch_size, generator),
        steps=lambda epochs_left: HeadSteps(head, loss_fn, optimizer, scheduler, task=context.task),
        predict=predict, val_labels=val_labels, task=context.task, before_epoch=before_epoch,
        # Head epochs are tiny ops where OpenMP's thread wake-ups cost more than they save.
        threads=1,
    )


# L2 strength of the L-BFGS head, as scikit-learn's `LogisticRegression(C=...)`: the summed loss of
# one view of every training image plus ||W||^2 / (2 C). 1 is scikit-learn's default, and what the
# grid measurements of `graft.models.pooling` used.
LOGISTIC_C = 1.0
LBFGS_ITERATIONS = 500


def head_solver(config: TrainConfig, pooling: str) -> str:
    """`--head-solver auto`: L-BFGS for a linear head on grid-pooled features, else AdamW.

    On grid features (11 520 wide for EfficientNet-Lite0 at 3x3) the AdamW epochs that fit the
    average-pooled features well overfit 200 training images: test accuracy 0.770 on a 5x5 grid,
    against 0.812 for the 3x3 grid's features solved as an L2-regularised logistic regression
    (20-shot Fashion-MNIST, seed 0, docs/benchmarks.md). On the 1 280 average-pooled ones the two are within noise, and AdamW
    keeps its per-epoch history.
    """
    if config.head_solver != "auto":
        return config.head_solver
    return "lbfgs" if pooling != "avg" and config.head == "linear" else "adamw"


def fit_logistic_regression(
    head: nn.Module,
    train_views: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    context: TrainContext,
) -> tuple[nn.Module, "FitResult", torch.Tensor]:  # noqa: F821
    """The linear head as multinomial logistic regression, solved to convergence by L-BFGS.

    The objective is scikit-learn's (`LogisticRegression(C=...)`): cross-entropy summed over the
    training images (averaged over their cached views) plus ||W||^2 / (2 C), the bias not
    penalised; class weights as `--class-weighting` says. It is solved at each of the task's
    `l2_strengths` (one for single-label, a range for label sets) and the C whose head scores
    best on validation (the task's score, then its loss) is kept. It starts from zero and uses
    every image at once, so it is deterministic and has nothing to resume; the history has one line.
    """
    import time

    linear = next((m for m in head.modules() if isinstance(m, nn.Linear)), None)
    if linear is None or sum(isinstance(m, nn.Linear) for m in head.modules()) != 1:
        raise ConfigError("--head-solver lbfgs: fits a linear head only; use --head linear, or --head-solver adamw")
    config, task = context.config, context.task
    started = time.perf_counter()
    views, count = train_views.shape[0], train_views.shape[1]
    inputs = train_views.reshape(views * count, -1).float()
    targets = train_labels.repeat(views, *[1] * (train_labels.dim() - 1))  # (N,) class indices or (N, C) label sets
    if task.name == "multilabel":  # one binary logistic regression per label (scikit-learn's one-vs-rest)
        weights = positive_weights(train_labels) if config.class_weighting == "balanced" else None
    else:
        weights = class_weights(train_labels, context.head_spec.num_classes, config.class_weighting)
    scored = {}  # C -> (validation score, validation loss, the head's state)
    for c in task.l2_strengths:
        solve_logistic_regression(linear, inputs, targets, views=views, class_weight=weights, c=c)
        with torch.no_grad():
            val_loss, val_score = task.evaluate(head.eval()(val_features), val_labels)
        scored[c] = (val_score, val_loss, {k: v.clone() for k, v in head.state_dict().items()})
    c = _best_strength(scored)
    head.load_state_dict(scored[c][2])
    with torch.no_grad():
        train_loss, train_accuracy = task.evaluate(head(inputs), targets)
        val_logits = head(val_features)
    val_loss, val_accuracy = task.evaluate(val_logits, val_labels)
    record = EpochRecord(epoch=0, train_loss=train_loss, train_accuracy=train_accuracy, val_loss=val_loss,
                         val_accuracy=val_accuracy, lr=[1.0], seconds=round(time.perf_counter() - started, 3))
    context.on_epoch([record])
    tried = ", ".join(f"{k:g}: {v[0]:.3f}" for k, v in scored.items()) if len(scored) > 1 else ""
    context.reporter.say(f"head: logistic regression by L-BFGS (C {c:g}{f', chosen on validation from {tried}' if tried else ''}), "
                         f"val {'mAP' if task.name == 'multilabel' else 'accuracy'} {val_accuracy:.3f}")
    result = FitResult(history=[record], best_epoch=0, best_val_accuracy=val_accuracy, best_val_loss=val_loss,
                       stopped_early=False, best_state=scored[c][2],
                       chose={"l2_c": c, "validation": {f"{k:g}": round(v[0], 4) for k, v in scored.items()}})
    return head, result, val_logits


def _best_strength(scored: dict[float, tuple[float, float, dict]]) -> float:
    """The C whose head scored highest on validation, then had the lower loss; without validation
    images (scores are NaN) the last one tried."""
    finite = {c: v for c, v in scored.items() if not math.isnan(v[0])}
    if not finite:
        return list(scored)[-1]
    return max(finite, key=lambda c: (finite[c][0], -finite[c][1]))


def solve_logistic_regression(linear: nn.Linear, inputs: torch.Tensor, targets: torch.Tensor, *, views: int = 1,
                              class_weight: torch.Tensor | None = None, c: float = LOGISTIC_C) -> None:
    """Set `linear` to the minimiser of scikit-learn's multinomial `LogisticRegression(C=c,
    class_weight=...)` objective on `inputs` (N, D) -> `targets` (N,): the class-weighted
    cross-entropy summed over the rows (divided by `views` when each image is `views` rows) plus
    ||W||^2 / (2 c), the bias not penalised. From zero, by L-BFGS with a strong-Wolfe line search.
    Multi-hot `targets` (N, C) make it C binary logistic regressions (one-vs-rest), `class_weight`
    then weighting each label's positives."""
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
    optimizer = torch.optim.LBFGS([linear.weight, linear.bias], lr=1, max_iter=LBFGS_ITERATIONS, history_size=10,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = inputs @ linear.weight.T + linear.bias
        if targets.dim() == 2:
            loss = nn.functional.binary_cross_entropy_with_logits(logits, targets.float(), pos_weight=class_weight, reduction="sum") / views
        else:
            loss = nn.functional.cross_entropy(logits, targets, weight=class_weight, reduction="sum") / views
        loss = loss + (linear.weight * linear.weight).sum() / (2 * c)
        loss.backward()
        return loss

    with intra_op_threads(1):
        optimizer.step(closure)
