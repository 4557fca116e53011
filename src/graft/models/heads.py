"""The new classifier head that replaces the backbone's ImageNet one."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from graft.choices import HEAD_KINDS
from graft.errors import ConfigError



@dataclass(frozen=True)
class HeadSpec:
    """What the head is: enough to rebuild it before loading its weights."""

    kind: str
    in_features: int
    num_classes: int
    hidden: int = 512
    dropout: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HeadSpec":
        return cls(**{k: data[k] for k in ("kind", "in_features", "num_classes", "hidden", "dropout")})


def make_head(spec: HeadSpec) -> nn.Module:
    """`linear`: dropout + linear layer. `mlp`: linear → GELU → dropout → linear (hidden units)."""
    if spec.num_classes < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, got {spec.num_classes}")
    if not 0.0 <= spec.dropout < 1.0:
        raise ConfigError(f"expected a number in [0, 1), got {spec.dropout}", parameter="dropout")
    if spec.kind == "linear":
        return nn.Sequential(nn.Dropout(spec.dropout), nn.Linear(spec.in_features, spec.num_classes))
    if spec.kind == "mlp":
        if spec.hidden < 1:
            raise ConfigError(f"expected a positive number of units, got {spec.hidden}", parameter="hidden")
        return nn.Sequential(
            nn.Linear(spec.in_features, spec.hidden),
            nn.GELU(),
            nn.Dropout(spec.dropout),
            nn.Linear(spec.hidden, spec.num_classes),
        )
    raise ConfigError(f"expected one of {', '.join(HEAD_KINDS)}, got {spec.kind!r}", parameter="head")
