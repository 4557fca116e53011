"""The names of graft's adaptation strategies, in a module of their own.

`graft.config` checks a run's `strategy` against them and `graft.strategies` maps each to its
class; neither has to import the other for that.
"""

from __future__ import annotations

STRATEGY_NAMES: tuple[str, ...] = (
    "feature-extract", "linear-probe", "partial", "full", "discriminative", "gradual", "lp-ft", "lora", "auto",
)
