"""Command-line options taken from `TrainConfig`: one declaration per option.

A `TrainConfig` field is the source of its option's name (`warmup_epochs`: `--warmup-epochs`),
default and help line; `graft train`, `graft inspect` and `graft compare` declare such options
with `config_option`, and `graft train` builds its config from them with `train_config`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import typer

from graft.config import TrainConfig

CONFIG_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}


def config_option(name: str, *flags: str, default: Any = dataclasses.MISSING) -> Any:
    """The typer option of the `TrainConfig` field `name`: the field's default and help line.

    `flags` replace the option's names (`"--train-bn"` makes a bool a plain flag); `default`
    replaces the field's default where the command has its own (`--out runs/graft`).
    """
    field = CONFIG_FIELDS[name]
    if default is dataclasses.MISSING:
        default = field.default if field.default is not dataclasses.MISSING else ...
    return typer.Option(default, *flags, help=config_help(name))


def config_help(name: str) -> str:
    """The help line of the `TrainConfig` field `name` (for an argument, which has no default)."""
    return CONFIG_FIELDS[name].metadata["help"]


def train_config(params: dict[str, Any]) -> TrainConfig:
    """The `TrainConfig` of a command's parsed options (paths as strings, as config.json holds them)."""
    return TrainConfig(**{name: str(params[name]) if isinstance(params[name], Path) else params[name] for name in CONFIG_FIELDS})


def flag(parameter: str) -> str:
    """The command-line option that sets a Python parameter: `warmup_epochs` -> `--warmup-epochs`."""
    return FLAGS.get(parameter, "--" + parameter.replace("_", "-"))


# Parameters whose option is not their name with dashes (the CLI takes them in other units).
FLAGS = {
    "max_upload_bytes": "--max-upload-mb",
    "max_pixels": "--max-megapixels",
    "max_request_pixels": "--max-request-megapixels",
}
