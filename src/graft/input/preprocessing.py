"""The backbone's own preprocessing: resolved from its pretrained config, stored, reused.

A `Preprocessing` travels with every bundle, so predict, serve and export feed the model exactly
what it saw in training. Transforms are built by timm from it (`build_transforms`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from torch import nn
from graft.choices import AUGMENT_LEVELS
from graft.errors import ConfigError

AugmentLevel = Literal["none", "light", "strong"]


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB image becomes the tensor the backbone expects (timm's data config, typed)."""

    input_size: tuple[int, int, int]
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    crop_mode: str = "center"

    @property
    def image_size(self) -> int:
        return int(self.input_size[-1])

    @property
    def resize_size(self) -> int:
        """The side evaluation resizes an image to before the center crop (timm's `scale_size`).

        An image needs no more pixels than this on its short side (`load_image(min_size=...)`).
        """
        return math.floor(max(self.input_size[1:]) / self.crop_pct)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocessing":
        return cls(
            input_size=tuple(int(v) for v in data["input_size"]),  # type: ignore[arg-type]
            interpolation=str(data["interpolation"]),
            mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
            crop_pct=float(data["crop_pct"]),
            crop_mode=str(data.get("crop_mode", "center")),
        )


def resolve_preprocessing(model: nn.Module) -> Preprocessing:
    """The preprocessing a timm model was pretrained with (`timm.data.resolve_data_config`)."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    return Preprocessing(
        input_size=tuple(int(v) for v in config["input_size"]),  # type: ignore[arg-type]
        interpolation=str(config.get("interpolation", "bicubic")),
        mean=tuple(float(v) for v in config["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in config["std"]),  # type: ignore[arg-type]
        crop_pct=float(config.get("crop_pct", 0.875)),
        crop_mode=str(config.get("crop_mode", "center")),
    )


def build_transforms(preprocessing: Preprocessing, *, augment: str = "none") -> Any:
    """The PIL-image → tensor transform: evaluation (`augment="none"`) or training augmentation.

    Evaluation is timm's resize + center crop + normalise. `light` adds a random resized crop
    (scale 0.6–1) and horizontal flip; `strong` uses a wider crop range and timm's RandAugment
    (`rand-m9-mstd0.5`; the "inc1" variant can ask Pillow for 0-bit posterize) for tiny data. Augmentation is never applied at evaluation.
    """
    from timm.data import create_transform

    common = dict(
        input_size=preprocessing.input_size,
        interpolation=preprocessing.interpolation,
        mean=preprocessing.mean,
        std=preprocessing.std,
        crop_pct=preprocessing.crop_pct,
        crop_mode=preprocessing.crop_mode,
    )
    if augment == "none":
        return create_transform(is_training=False, **common)
    if augment == "light":
        return create_transform(
            is_training=True, scale=(0.6, 1.0), hflip=0.5, color_jitter=0.0, **common
        )
    if augment == "strong":
        return create_transform(
            is_training=True, scale=(0.35, 1.0), hflip=0.5, color_jitter=0.0,
            auto_augment="rand-m9-mstd0.5", **common,
        )

    raise ConfigError(f"expected one of {', '.join(AUGMENT_LEVELS)}, got {augment!r}", parameter="augment")
