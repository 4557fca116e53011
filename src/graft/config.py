"""The settings of a training run: one frozen, typed dataclass, saved whole as `config.json`."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from graft.choices import (
    AUGMENT_LEVELS, COMPILE_SETTINGS, DEFAULT_BACKBONE, HEAD_KINDS, POOLINGS, PRECISIONS, STRATEGY_NAMES,
)
from graft.errors import ConfigError
from graft.ranges import BATCH_SIZE, EPOCHS_MAX, SEED, Range, check_number

CLASS_WEIGHTINGS = ("none", "balanced")
BN_STATS = ("auto", "frozen", "update")
HEAD_SOLVERS = ("auto", "adamw", "lbfgs")
TASKS = ("auto", "classification", "multilabel")
MULTILABEL_LOSSES = ("bce", "asymmetric")

# The range of every numeric field (checked, with finiteness, by `TrainConfig`); a refused
# value is a `ConfigError` whose `parameter` is the field's name.
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


def _option(default: Any, help: str) -> Any:
    """A field with its default and its help line (`graft train --help` shows the same text)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run. `None` means "the strategy's default" where noted.

    Each field's help line is in its metadata (`dataclasses.fields(TrainConfig)[i].metadata["help"]`);
    `graft train` takes its options, their defaults and help lines from here.
    """

    data: str = field(metadata={"help": "Folder with one sub-folder per class (split folders train/, valid/ and a held-out test/ used if present, any case), or a CSV of path,label (path,labels: several labels per image, see --task)."})
    out: str = field(metadata={"help": "Run folder to write (config, history, metrics, bundle): a new or empty folder, or a graft run to --resume or --overwrite."})
    backbone: str = _option(DEFAULT_BACKBONE, "Any timm model name; bundled offline: efficientnet_lite0/1/2.")
    weights: str | None = _option(None, "Local state-dict file for the backbone (safetensors or torch).")
    strategy: str = _option("auto", "Adaptation strategy (see `graft inspect --strategy`): auto measures the framing, the pooling and the data, picks one and keeps a fine-tuned model only if it beats the frozen features on validation; feature-extract is the quickest path (frozen backbone, head only).")
    head: str = _option("linear", "New classifier head: linear or mlp.")
    hidden: int = _option(512, "Hidden units of the mlp head.")
    dropout: float = _option(0.0, "Dropout before the head's last layer.")
    epochs: int | None = _option(None, "Epochs (default: the strategy's; lp-ft: its fine-tuning epochs, its probe trains to its own budget).")
    batch_size: int = _option(32, "Training batch size.")
    lr: float | None = _option(None, "Learning rate of the head (default: the strategy's).")
    weight_decay: float = _option(1e-4, "AdamW weight decay.")
    warmup_epochs: int = _option(1, "Linear warmup before the cosine decay.")
    label_smoothing: float = _option(0.1, "Label smoothing of the training loss.")
    patience: int | None = _option(None, "Stop after this many epochs without validation improvement (default: the strategy's).")
    seed: int = _option(0, "Seed of the split, the initialisation and the batches.")
    val_fraction: float = _option(0.2, "Share of each class held out for validation when no valid/ folder exists.")
    on_bad_image: str = _option("error", "error: stop and list unreadable images; skip: train without them.")
    augment: str = _option("light", "Training augmentation: none, light or strong.")
    augment_views: int | None = _option(None, "Augmented views per training image to cache (default: 0 for feature-extract, 4 when a frozen prefix is cached).")
    class_weighting: str = _option("none", "none or balanced (inverse class frequency; multi-label: each label's positives weighted by its negatives per positive).")
    task: str = _option("auto", "classification (one label per image), multilabel (a set of labels per image: sigmoid scores, per-label thresholds), or auto (multilabel for a CSV with a labels column or 0/1 label columns).")
    multilabel_loss: str = _option("bce", "Multi-label training loss: bce (binary cross-entropy) or asymmetric (down-weights easy negatives, for many labels per image that are mostly absent).")
    train_stages: int | None = _option(None, "partial, lp-ft: how many of the last stages train (default: 1 for partial, all for lp-ft).")
    lr_decay: float = _option(0.3, "Discriminative rates: each earlier stage's lr is this times the next one's.")
    thaw_every: int = _option(1, "gradual: epochs between two thaws.")
    train_bn: bool = _option(False, "Let BatchNorm affine parameters of frozen stages train (statistics stay frozen).")
    bn_stats: str = _option("auto", "BatchNorm statistics in the stages that train: frozen, update, or auto (frozen below 100 images per class).")
    lora_rank: int = _option(8, "lora: rank of the adapters.")
    crop_pct: float | None = _option(None, "Evaluation crop as a share of the image (1 = whole frame); default: the backbone's own (auto measures both).")
    pooling: str | None = _option(None, "How the last feature map becomes the head's input: avg (the backbone's own global average), grid (the mean of each cell of a 3x3 grid: keeps where things are, for aligned objects such as product shots, digits, scans), grid-2 (3x3 grids of the last two stages' outputs: adds the more generic features of the stage before the last) or grid-3 (adds a 5x5 grid of the stage before that, whose map is twice as fine); default: avg (auto measures them all).")
    head_solver: str = _option("auto", "How a head on cached features is fitted: adamw (epochs, early stopping), lbfgs (linear head: L2-regularised logistic regression solved to convergence; label sets: at C 0.01 to 1, the best on validation kept), or auto (lbfgs for grid pooling, else adamw).")
    precision: str = _option("auto", "auto (bf16 on a GPU that runs it natively; on a CPU with native bf16, whichever of fp32 and bf16 ran the backbone faster, measured once and kept in the cache folder; else fp32), fp32 or bf16. Training in bf16 on a CPU keeps the trained depthwise convolutions in fp32 (faster there).")
    device: str = _option("auto", "auto, cpu, cuda or cuda:N.")
    compile: str = _option("auto", "torch.compile: on, off, or auto. auto compiles the frozen backbone for extraction on CPU from 50 000 images, and on a GPU the training step when its timed first steps say the run saves more than compiling costs.")
    cache_dir: str | None = _option(None, "Feature cache folder (default: $GRAFT_CACHE_DIR or ~/.cache/graft).")
    check_data: bool = _option(True, "Check the data after training (likely wrong labels, duplicates and train/validation leaks, small or imbalanced classes, tiny and grayscale images; as `graft check`): data_check.csv and a report section. The features come from the cache training filled; a strategy that fine-tunes pays one frozen pass over the images.")

    def __post_init__(self) -> None:
        checks = [
            ("strategy", STRATEGY_NAMES),
            ("head", HEAD_KINDS),
            ("augment", AUGMENT_LEVELS),
            ("precision", PRECISIONS),
            ("compile", COMPILE_SETTINGS),
            ("class_weighting", CLASS_WEIGHTINGS),
            ("bn_stats", BN_STATS),
            ("on_bad_image", ("error", "skip")),
            ("head_solver", HEAD_SOLVERS),
            ("task", TASKS),
            ("multilabel_loss", MULTILABEL_LOSSES),
        ]
        for name, choices in checks:
            if getattr(self, name) not in choices:
                raise ConfigError(f"{getattr(self, name)!r} is not one of {', '.join(choices)}", parameter=name)
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ConfigError(f"{self.pooling!r} is not one of {', '.join(POOLINGS)}", parameter="pooling")
        for name, allowed in NUMBER_RANGES.items():
            # Stored as plain Python numbers: a NumPy scalar would reach config.json as a string.
            object.__setattr__(self, name, check_number(name, getattr(self, name), allowed))

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
