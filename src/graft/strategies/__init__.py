"""Adaptation strategies: what to freeze, what to train and at which learning rate.

A strategy is a small object with one job: given the backbone's stages and the run's settings,
say what trains (`audit`) and train it (`train`). The loop itself is `graft.loop.fit`.
"""

from __future__ import annotations

from graft.errors import ConfigError
from graft.strategies.base import AuditRow, Strategy, TrainContext, TrainOutcome
from graft.strategies.auto import Auto
from graft.strategies.feature_extract import FeatureExtract
from graft.strategies.finetune import Discriminative, Full, Gradual, LinearProbeThenFineTune, Lora, Partial

STRATEGIES: dict[str, type[Strategy]] = {
    "feature-extract": FeatureExtract,
    "linear-probe": FeatureExtract,
    "partial": Partial,
    "full": Full,
    "discriminative": Discriminative,
    "gradual": Gradual,
    "lp-ft": LinearProbeThenFineTune,
    "lora": Lora,
    "auto": Auto,
}
STRATEGY_NAMES: tuple[str, ...] = tuple(STRATEGIES)


def get_strategy(name: str) -> Strategy:
    """The strategy called `name` (plain strings: "feature-extract", ...)."""
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ConfigError(f"--strategy: {name!r} is not one of {', '.join(STRATEGY_NAMES)}") from None


__all__ = ["AuditRow", "STRATEGIES", "STRATEGY_NAMES", "Strategy", "TrainContext", "TrainOutcome", "get_strategy"]
