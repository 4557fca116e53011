"""The settings of a training run: one frozen, typed dataclass, saved whole as `config.json`."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from graft.backbones import DEFAULT_BACKBONE
from graft.errors import ConfigError
from graft.heads import HEAD_KINDS
from graft.numerics import COMPILE_SETTINGS, PRECISIONS
from graft.pooling import POOLINGS
from graft.preprocessing import AUGMENT_LEVELS
from graft.ranges import BATCH_SIZE, EPOCHS_MAX, SEED, Range, check_number

CLASS_WEIGHTINGS = ("none", "balanced")
BN_STATS = ("auto", "frozen", "update")
HEAD_SOLVERS = ("auto", "adamw", "lbfgs")

# The range of every numeric field (checked, with finiteness, by `TrainConfig`); the option
# that sets a field is its name with dashes (`warmup_epochs`: `--warmup-epochs`).
NUMBER_RANGES: dict[str, Range] = {
    "hidden": Range(int, 1, 16384),
    "dropout": Range(float, 0, 1, high_open=True),
    "epochs": Range(int, 1, EPOCHS_MAX, optional=True),
    "batch_size": BATCH_SIZE,
    "lr": Range(float, 0, 10, low_open=True, optional=True, hint="(AdamW rates are usually 1e-5 to 1e-2)"),
    "weight_decay": Range(float, 0, 10),
    "warmup_epochs": Range(int, 0, EPOCHS_MAX),
    "label_smoothing": Range(float, 0, 1, high_open=True),
    "patience": Range(int, 1, EPOCHS_MAX, optional=True),
    "seed": SEED,
    "val_fraction": Range(float, 0, 1, low_open=True, high_open=True),
    "augment_views": Range(int, 0, 100, optional=True),
    "train_stages": Range(int, 1, 1000, optional=True),
    "lr_decay": Range(float, 0, 1, low_open=True),
    "thaw_every": Range(int, 1, EPOCHS_MAX),
    "lora_rank": Range(int, 1, 256),
    # The image is resized to input size / crop_pct before the centre crop: 0.2 is a 5x larger side.
    "crop_pct": Range(float, 0.2, 1, optional=True, hint="(a share of the image; 1 keeps the whole frame)"),
}


def option_name(field_name: str) -> str:
    """The command-line option of a `TrainConfig` field: `warmup_epochs` -> `--warmup-epochs`."""
    return "--" + field_name.replace("_", "-")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run. `None` means "the strategy's default" where noted."""

    data: str
    out: str
    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    strategy: str = "feature-extract"
    head: str = "linear"
    hidden: int = 512
    dropout: float = 0.0
    epochs: int | None = None  # None: the strategy's default
    batch_size: int = 32
    lr: float | None = None  # None: the strategy's default
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    label_smoothing: float = 0.1
    patience: int | None = None  # epochs without improvement before stopping; None: strategy's default
    seed: int = 0
    val_fraction: float = 0.2
    on_bad_image: str = "error"
    augment: str = "light"  # augmentation for augmented views / fine-tuning
    augment_views: int | None = None  # augmented views cached per training image; None: strategy's default
    class_weighting: str = "none"
    train_stages: int | None = None  # partial, lp-ft: how many of the last stages train; None: the strategy's default
    lr_decay: float = 0.3  # discriminative rates: each earlier stage's lr is this times the next one's
    thaw_every: int = 1  # gradual: epochs between two thaws
    train_bn: bool = False  # let BatchNorm affine parameters of frozen stages train (stats stay frozen)
    bn_stats: str = "auto"  # BatchNorm statistics of trainable stages: frozen, update, or auto (by data size)
    lora_rank: int = 8
    crop_pct: float | None = None  # None: the backbone's own evaluation crop (auto may measure a full-frame view)
    pooling: str | None = None  # "avg", "grid", "grid-2" or "grid-3" (graft.pooling); None: the backbone's average (auto measures them)
    head_solver: str = "auto"  # adamw, lbfgs (linear head on cached features), or auto (lbfgs for the grid poolings)
    precision: str = "auto"  # bf16 autocast where the hardware runs it natively, else fp32
    device: str = "auto"
    compile: str = "auto"  # torch.compile the frozen backbone and the training step: on, off, or auto (graft.compiling)
    cache_dir: str | None = None  # None: graft's default cache folder

    def __post_init__(self) -> None:
        from graft.strategies import STRATEGY_NAMES

        checks = [
            ("--strategy", self.strategy, STRATEGY_NAMES),
            ("--head", self.head, HEAD_KINDS),
            ("--augment", self.augment, AUGMENT_LEVELS),
            ("--precision", self.precision, PRECISIONS),
            ("--compile", self.compile, COMPILE_SETTINGS),
            ("--class-weighting", self.class_weighting, CLASS_WEIGHTINGS),
            ("--bn-stats", self.bn_stats, BN_STATS),
            ("--on-bad-image", self.on_bad_image, ("error", "skip")),
            ("--head-solver", self.head_solver, HEAD_SOLVERS),
        ]
        for option, value, choices in checks:
            if value not in choices:
                raise ConfigError(f"{option}: {value!r} is not one of {', '.join(choices)}")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ConfigError(f"--pooling: {self.pooling!r} is not one of {', '.join(POOLINGS)}")
        for name, allowed in NUMBER_RANGES.items():
            # Stored as plain Python numbers: a NumPy scalar would reach config.json as a string.
            object.__setattr__(self, name, check_number(option_name(name), getattr(self, name), allowed))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"config: unknown settings {unknown}; known ones are {sorted(names)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    @property
    def out_path(self) -> Path:
        return Path(self.out)
