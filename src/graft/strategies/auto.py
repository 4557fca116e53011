"""`auto`: measure the data and its distance from the backbone's pretraining, then choose.

A run reads as three steps:
1. measure (`graft.strategies.auto_measure`): the framing (the backbone's crop or the whole frame)
   and, for few images per class, the pooling, each by probes scored on the validation images;
   then the size and balance of the data and its distance from the pretraining domain, from one
   pass of the frozen backbone whose features land in the cache the chosen strategy reuses;
2. choose (`graft.strategies.auto_rule.choose`): the documented rule, data size × domain
   distance → strategy and settings, with one sentence saying why;
3. train the chosen strategy on the chosen view and pooling; options the user set explicitly win
   over the rule's, and `metrics.json: auto` records what was measured and chosen.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from graft.config import TrainConfig
from graft.console import show_audit
from graft.models.heads import make_head
from graft.models.stages import Stage
from graft.strategies import get_strategy
from graft.strategies.auto_measure import (
    choose_framing,
    choose_pooling,
    chosen_view_accuracy,
    describe_framing,
    describe_pooling,
    measure,
)
from graft.strategies.auto_rule import Choice, Measurements, choose
from graft.strategies.base import AuditRow, TrainContext, TrainOutcome, with_prefix_tap
from graft.strategies.finetune import FineTune, cached_prefix_split


class Auto:
    name = "auto"
    default_epochs = 10
    default_lr = 1e-3
    default_patience = 5

    def audit(self, backbone: nn.Module, stages: list[Stage], head: nn.Module, config: TrainConfig) -> list[AuditRow]:
        # What trains is decided after measuring the data; the chosen strategy prints its own.
        rows = [AuditRow(f"{stage.name} (decided by measurement)", 0, stage.num_params, None, "?") for stage in stages]
        head_params = sum(p.numel() for p in head.parameters())
        rows.append(AuditRow("head", head_params, head_params, None, "-"))
        return rows

    def train(self, context: TrainContext) -> TrainOutcome:
        context, measured, views = _measure(context)
        choice = choose(measured)
        options, config = _resolve(choice, context.config)
        context.reporter.say("auto measured: " + ", ".join(f"{k} {v}" for k, v in measured.to_dict().items()))
        context.reporter.say(f"auto rule: {choice.rule}. {choice.reason}")
        context.reporter.say(f"auto chose {choice.strategy} with {options}")
        outcome, trainable_params = _train_chosen(context, choice, config)
        outcome.notes = {**outcome.notes, "trainable_params": trainable_params, "auto": {
            "measured": measured.to_dict(), **views, "chose": choice.strategy,
            "options": options, "rule": choice.rule, "reason": choice.reason}}
        outcome.preprocessing = context.backbone.preprocessing
        outcome.pooling, outcome.head_spec = context.backbone.pooling, context.head_spec
        return outcome


def _resolve(choice: Choice, config: TrainConfig) -> tuple[dict[str, Any], TrainConfig]:
    """The chosen strategy's options, where the ones the user gave explicitly win, and its config."""
    user_set = {k: getattr(config, k) for k in choice.options if getattr(config, k) != getattr(TrainConfig, k, None)}
    options = {**choice.options, **user_set}
    return options, config.replace(strategy=choice.strategy, **options)


def _expected_prefix_end(context: TrainContext, choice: Choice | None = None) -> str | None:
    """Where the frozen prefix ends that `choice`'s strategy trains on from cached outputs; None
    when it trains on none. Without `choice`: the rule's choice if the data proves distant (the
    size and balance are known before any feature is computed; the distance is not)."""
    if choice is None:
        train = context.dataset.train
        counts = [n for n in train.counts().values() if n]
        if not counts:
            return None
        choice = choose(Measurements(num_classes=len(counts), images_per_class=train.images_per_class(),
                                     imbalance=max(counts) / min(counts), imagenet_confidence=0.0, probe_accuracy=0.0,
                                     pooling=context.backbone.pooling))
    strategy = get_strategy(choice.strategy)
    if not isinstance(strategy, FineTune):
        return None
    _, config = _resolve(choice, context.config)
    split = cached_prefix_split(context.backbone.model, strategy.full_plan(context.stages, config), context,
                                config.epochs or strategy.default_epochs)
    return split[0].names[-1] if split is not None else None


def _measure(context: TrainContext) -> tuple[TrainContext, Measurements, dict[str, dict[str, Any]]]:
    """The context to train in (the chosen view and pooling), what the rule reads, and what the
    framing and the pooling measured (each empty where it was not measured)."""
    # The rule's choice for distant data of this size may train on cached outputs of a frozen
    # prefix; the framing's full passes keep that prefix's outputs (dropped if it is not chosen).
    expected = _expected_prefix_end(context)
    if expected is not None:
        context = with_prefix_tap(context, expected)
    context, framing = choose_framing(context)
    if framing:
        context.reporter.say(describe_framing(framing))
    # The framing probes were scored on validation already: the chosen view's score is the
    # probe accuracy, and a cross-validated one need not be fitted again.
    measured = measure(context, probe_accuracy=chosen_view_accuracy(framing))
    context, pooling = choose_pooling(context)
    measured = replace(measured, pooling=context.backbone.pooling)
    if pooling:
        context.reporter.say(describe_pooling(pooling))
    return context, measured, {"framing": framing, "pooling": pooling}


def _train_chosen(context: TrainContext, choice: Choice, config: TrainConfig) -> tuple[TrainOutcome, int]:
    """Train `choice`'s strategy with `config`; its outcome and how many parameters it trained."""
    strategy = get_strategy(choice.strategy)
    audit = strategy.audit(context.backbone.model, context.stages, make_head(context.head_spec), config)
    show_audit(context.reporter, f"strategy {choice.strategy} (chosen by auto): what trains", audit)
    kept = context.tap if context.tap is not None and _expected_prefix_end(context, choice) == context.tap.module_name else None
    if context.tap is not None and kept is None:
        context.tap.outputs.clear()  # a prefix's outputs per image, not to be held while training
    outcome = strategy.train(TrainContext(**{**context.__dict__, "config": config, "tap": kept}))
    return outcome, sum(row.trainable_params for row in audit)
