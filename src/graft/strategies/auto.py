"""`auto`: measure the data and its distance from the backbone's pretraining, then choose.

A run reads as three steps:
1. measure (`graft.strategies.auto_measure`): the framing (the backbone's crop or the whole frame)
   and the pooling, each by probes scored on the validation images; then the size and balance of
   the data and its distance from the pretraining domain, from one pass of the frozen backbone
   whose features land in the cache the chosen strategy reuses;
2. choose (`graft.strategies.auto_rule.choose`): the documented rule, data size × domain
   distance → strategy and settings, with one sentence saying why;
3. train: a frozen choice on the chosen view and pooling; a choice that trains the backbone on the
   chosen view (average-pooled, as its figures were measured) beside the best frozen candidate
   (the chosen view and pooling, head only, from the cache), and it is kept only if it beats that
   candidate on validation (`auto_rule.keeps_fine_tuning`). Options the user set explicitly win
   over the rule's. `metrics.json: auto` records every candidate with its validation accuracy and
   standard error, what was chosen and kept and why, and the kept strategy's audit and settings.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
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
from graft.strategies.auto_rule import (
    FROZEN_STRATEGIES, LABEL_RANKING_AP, Choice, Measurements, ViewScore, accuracy_difference_se, accuracy_se, choose,
    keeps_fine_tuning,
)
from graft.strategies.base import AuditRow, TrainContext, TrainOutcome, with_prefix_tap
from graft.strategies.feature_extract import head_solver
from graft.strategies.finetune import FineTune, cached_prefix_split
from graft.training.metrics import label_ranking_precision


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
        context, measured, views, tuning = _measure(context)
        choice = choose(measured)
        options, config = _resolve(choice, context.config)
        context.reporter.say("auto measured: " + ", ".join(f"{k} {v}" for k, v in measured.to_dict().items()))
        context.reporter.say(f"auto rule: {choice.rule}. {choice.reason}")
        context.reporter.say(f"auto chose {choice.strategy} with {options}")
        if choice.fine_tunes:
            kept, trained, decision = _fine_tune_or_frozen(context, tuning, choice, config)
        else:
            kept = _train_candidate(context, choice.strategy, config, "chosen by auto", choice)
            trained, decision = [kept], None
        outcome = kept.outcome
        outcome.notes = {**outcome.notes, "trainable_params": kept.trainable_params, "auto": {
            "measured": measured.to_dict(), **views, "measure": _measure_name(context),
            "candidates": _candidates(views, trained, kept),
            "chose": choice.strategy, "options": options, "rule": choice.rule, "reason": choice.reason,
            "kept": kept.strategy, "decision": decision,
            "audit": [asdict(row) for row in kept.audit], "settings": kept.settings()}}
        outcome.preprocessing = kept.context.backbone.preprocessing
        outcome.pooling, outcome.head_spec = kept.context.backbone.pooling, kept.context.head_spec
        return outcome


# Settings a frozen backbone's head does not read, and those an L-BFGS head does not either.
_FINE_TUNING_ONLY = {"train_stages", "lr_decay", "thaw_every", "train_bn", "bn_stats", "lora_rank"}
_ADAMW_ONLY = {"epochs", "lr", "patience", "batch_size", "weight_decay", "warmup_epochs", "label_smoothing"}


@dataclass
class _Trained:
    """One strategy auto trained: its settings, the context it trained in, its audit and outcome."""

    strategy: str
    config: TrainConfig
    context: TrainContext
    audit: list[AuditRow]
    outcome: TrainOutcome

    @property
    def trainable_params(self) -> int:
        return sum(row.trainable_params for row in self.audit)

    def score(self) -> ViewScore:
        """Its validation score per image and mean, and its log-loss: for one label per image, 1
        for a right top class (the mean is the accuracy) and cross-entropy; for label sets, each
        image's label-ranking average precision and the mean binary cross-entropy."""
        labels = torch.tensor(self.context.dataset.val.labels)
        logits = self.outcome.val_logits.float()
        measure = _measure_name(self.context)
        if len(labels) == 0:
            return ViewScore(0.0, 0.0, (), measure)
        if measure == LABEL_RANKING_AP:  # the logits rank each image's labels as the sigmoid scores do
            precision = label_ranking_precision(labels.numpy(), logits.numpy())
            loss = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float()))
            return ViewScore(float(precision.mean()), loss, tuple(precision.tolist()), LABEL_RANKING_AP)
        correct = (logits.argmax(1) == labels).double()
        loss = float(torch.nn.functional.cross_entropy(logits, labels))
        return ViewScore(float(correct.mean()), loss, tuple(correct.tolist()))

    def settings(self) -> dict[str, Any]:
        """The settings it trained with, the strategy's defaults filled in where none was given."""
        strategy = get_strategy(self.strategy)
        config = self.config
        resolved = {"epochs": config.epochs or strategy.default_epochs, "lr": config.lr or strategy.default_lr,
                    "patience": config.patience or strategy.default_patience,
                    "crop_pct": self.context.backbone.preprocessing.crop_pct, "pooling": self.context.backbone.pooling}
        skip = {"data", "out", "cache_dir", "weights", "device"}
        if self.strategy in FROZEN_STRATEGIES:
            resolved["head_solver"] = head_solver(config, self.context.backbone.pooling)
            skip |= _FINE_TUNING_ONLY | (_ADAMW_ONLY if resolved["head_solver"] == "lbfgs" else set())
        return {k: v for k, v in {**config.to_dict(), **resolved}.items() if k not in skip}

    def record(self) -> dict[str, Any]:
        """What the candidates table shows of it."""
        score = self.score()
        return {"kind": "trained", "name": f"{self.strategy} ({self.context.backbone.pooling} pooling)",
                "accuracy": round(score.accuracy, 4), "standard_error": round(accuracy_se(score), 4),
                "loss": round(score.loss, 4), "epochs_run": len(self.outcome.fit.history),
                "trainable_params": self.trainable_params}


def _measure_name(context: TrainContext) -> str:
    """What auto scores each candidate by on validation: "accuracy" for one label per image,
    label-ranking AP for label sets (an image's whole set is rarely all right at 0.5)."""
    return LABEL_RANKING_AP if context.dataset.task == "multilabel" else "accuracy"


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
                                     pooling=context.backbone.pooling, label_sets=context.dataset.task == "multilabel"))
    strategy = get_strategy(choice.strategy)
    if not isinstance(strategy, FineTune):
        return None
    _, config = _resolve(choice, context.config)
    split = cached_prefix_split(context.backbone.model, strategy.full_plan(context.stages, config), context,
                                config.epochs or strategy.default_epochs)
    return split[0].names[-1] if split is not None else None


def _measure(context: TrainContext) -> tuple[TrainContext, Measurements, dict[str, dict[str, Any]], TrainContext]:
    """The context to train frozen in (the chosen view and pooling), what the rule reads, what the
    framing and the pooling measured (each empty where it was not measured), and the context to
    fine-tune in (the chosen view, pooled as the user said or by the average)."""
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
    tuning = context
    context, pooling = choose_pooling(context)
    measured = replace(measured, pooling=context.backbone.pooling)
    if pooling:
        context.reporter.say(describe_pooling(pooling))
    return context, measured, {"framing": framing, "pooling": pooling}, tuning


def _train_candidate(context: TrainContext, strategy_name: str, config: TrainConfig, role: str,
                     choice: Choice | None = None) -> _Trained:
    """Train `strategy_name` with `config` in `context`, its audit shown first. With `choice`, the
    prefix outputs the framing kept go on where that choice trains on the same cached prefix (and
    are let go otherwise); without it, the candidate trains with no tap."""
    strategy = get_strategy(strategy_name)
    audit = strategy.audit(context.backbone.model, context.stages, make_head(context.head_spec), config)
    show_audit(context.reporter, f"strategy {strategy_name} ({role}): what trains", audit)
    kept = None
    if choice is not None and context.tap is not None and _expected_prefix_end(context, choice) == context.tap.module_name:
        kept = context.tap
    elif choice is not None and context.tap is not None:
        context.tap.outputs.clear()  # a prefix's outputs per image, not to be held while training
    outcome = strategy.train(replace(context, config=config, tap=kept))
    return _Trained(strategy_name, config, context, audit, outcome)


def _fine_tune_or_frozen(context: TrainContext, tuning: TrainContext, choice: Choice,
                         config: TrainConfig) -> tuple[_Trained, list[_Trained], dict[str, Any]]:
    """Train the best frozen candidate (the chosen view and pooling, head only, from the cache),
    then `choice` on `tuning`'s view; keep the fine-tuned model only if it beats the frozen one on
    validation (`keeps_fine_tuning`). Returns (kept, both, the decision as recorded)."""
    weighting = {k: v for k, v in choice.options.items() if k == "class_weighting"}
    _, frozen_config = _resolve(Choice("feature-extract", {"augment_views": 0, **weighting}, "", ""), context.config)
    # No checkpoint, no history of its own on disk: the kept candidate's history is written last.
    frozen = _train_candidate(replace(context, tap=None, checkpoint=None, on_epoch=lambda history: None),
                              "feature-extract", frozen_config, "auto's frozen candidate")
    # The frozen candidate's model shares the pretrained weights: the fine-tuning trains a copy.
    tuning = replace(tuning, backbone=replace(tuning.backbone, model=copy.deepcopy(tuning.backbone.model)))
    tuned = _train_candidate(tuning, choice.strategy, config, "chosen by auto", choice)
    tuned_score, frozen_score = tuned.score(), frozen.score()
    keep = keeps_fine_tuning(tuned_score, frozen_score)
    kept = tuned if keep else frozen
    context.on_epoch(kept.outcome.fit.history)
    se = accuracy_difference_se(tuned_score, frozen_score)
    why = (f"{choice.strategy} scored {tuned_score.accuracy:.3f} validation {tuned_score.measure} against "
           f"{frozen_score.accuracy:.3f} for the frozen "
           f"features ({frozen.context.backbone.pooling} pooling), a difference {'beyond' if keep else 'within or below'} one "
           f"standard error ({se:.3f}): kept {kept.strategy}")
    context.reporter.say(f"auto kept {kept.strategy}: {why}")
    return kept, [frozen, tuned], {"fine_tuned": choice.strategy, "frozen": "feature-extract",
                                   "accuracy_difference": round(tuned_score.accuracy - frozen_score.accuracy, 4),
                                   "accuracy_difference_se": round(se, 4), "kept": kept.strategy, "why": why}


def _candidates(views: dict[str, dict[str, Any]], trained: list[_Trained], kept: _Trained) -> list[dict[str, Any]]:
    """Every candidate auto scored on validation, in the order it scored them: the framings, the
    poolings (probes), then the trained strategies."""
    rows = []
    framing = views.get("framing") or {}
    if framing:
        for key, crop in (("center", framing["center_crop"]), ("full", 1.0)):
            rows.append({"kind": "framing", "name": f"crop {crop:g}", "accuracy": framing[f"{key}_accuracy"],
                         "standard_error": framing.get(f"{key}_se"), "loss": framing[f"{key}_loss"],
                         "chosen": framing["crop_pct"] == crop})
    pooling = views.get("pooling") or {}
    for name, accuracy in pooling.get("accuracy", {}).items():
        rows.append({"kind": "pooling", "name": name, "accuracy": accuracy,
                     "standard_error": pooling.get("standard_error", {}).get(name), "loss": pooling["loss"][name],
                     "chosen": pooling["chose"] == name})
    return rows + [{**item.record(), "chosen": item is kept} for item in trained]
