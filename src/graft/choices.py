"""The plain-string choices of graft's options, in a module that imports nothing heavy.

`graft.config` checks a run's settings against them and the CLI lists them in `--help`; the
modules that act on a choice (`graft.strategies`, `graft.models.pooling`, ...) import them from
here, so checking a setting never loads torch and no module has to import its caller.
"""

from __future__ import annotations

STRATEGY_NAMES: tuple[str, ...] = (
    "feature-extract", "linear-probe", "partial", "full", "discriminative", "gradual", "lp-ft", "lora", "auto",
)
DEFAULT_BACKBONE = "efficientnet_lite0"
HEAD_KINDS: tuple[str, ...] = ("linear", "mlp")
POOLINGS: tuple[str, ...] = ("avg", "grid", "grid-2", "grid-3")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
COMPILE_SETTINGS: tuple[str, ...] = ("auto", "on", "off")
AUGMENT_LEVELS: tuple[str, ...] = ("none", "light", "strong")
# The resampling filters and crop modes timm's evaluation transform takes
# (`timm.data.transforms.str_to_interp_mode`, `transforms_imagenet_eval`): what a bundle may record.
INTERPOLATIONS: tuple[str, ...] = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES: tuple[str, ...] = ("center", "squash", "border")
# --unknown: answer `unknown` past the bundle's threshold, or never.
UNKNOWN_MODES: tuple[str, ...] = ("auto", "off")
