"""Adaptation strategies: what to freeze, what to train and at which learning rate.

A strategy is a small object with one job: given the backbone's stages and the run's settings,
say what trains (`audit`) and train it (`train`). The loop itself is `graft.training.loop.fit`.

Each strategy's module is imported when it is first asked for, so the parts that need no torch
(`auto_rule`, `STRATEGY_NAMES`) import without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from graft.choices import STRATEGY_NAMES
from graft.errors import ConfigError

if TYPE_CHECKING:
    from graft.strategies.base import AuditRow, Strategy, TrainContext, TrainOutcome

_STRATEGY_CLASSES: dict[str, tuple[str, str]] = {  # name -> (module, class)
    "feature-extract": ("graft.strategies.feature_extract", "FeatureExtract"),
    "linear-probe": ("graft.strategies.feature_extract", "FeatureExtract"),
    "partial": ("graft.strategies.finetune", "Partial"),
    "full": ("graft.strategies.finetune", "Full"),
    "discriminative": ("graft.strategies.finetune", "Discriminative"),
    "gradual": ("graft.strategies.finetune", "Gradual"),
    "lp-ft": ("graft.strategies.finetune", "LinearProbeThenFineTune"),
    "lora": ("graft.strategies.finetune", "Lora"),
    "auto": ("graft.strategies.auto", "Auto"),
}
_BASE_NAMES = ("AuditRow", "Strategy", "TrainContext", "TrainOutcome")


def get_strategy(name: str) -> Strategy:
    """The strategy called `name` (plain strings: "feature-extract", ...)."""
    if name not in _STRATEGY_CLASSES:
        raise ConfigError(f"{name!r} is not one of {', '.join(STRATEGY_NAMES)}", parameter="strategy")
    return _strategy_class(name)()


def _strategy_class(name: str) -> type[Strategy]:
    module, cls = _STRATEGY_CLASSES[name]
    return getattr(importlib.import_module(module), cls)


def __getattr__(name: str) -> Any:
    if name in _BASE_NAMES:
        value = getattr(importlib.import_module("graft.strategies.base"), name)
    elif name == "STRATEGIES":  # name -> strategy class
        value = {strategy: _strategy_class(strategy) for strategy in STRATEGY_NAMES}
    else:
        raise AttributeError(f"module 'graft.strategies' has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = ["AuditRow", "STRATEGIES", "STRATEGY_NAMES", "Strategy", "TrainContext", "TrainOutcome", "get_strategy"]
