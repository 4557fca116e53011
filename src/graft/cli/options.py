"""Command-line options taken from `TrainConfig`: one declaration per option.

A `TrainConfig` field is the source of its option's name (`warmup_epochs`: `--warmup-epochs`),
type, default and help line. `graft train`, `graft inspect` and `graft compare` take such options
with `config_options` (a decorator that adds them to the command's signature, as typer reads it),
and `graft train` builds its config from them with `train_config`.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

import typer

from graft.config import TrainConfig

UNKNOWN_HELP = ("auto: answer 'unknown' for an image unlike the training images (past the bundle's threshold, which keeps "
                "95 % of its validation images), with its unknown_score; off: always one of the classes.")
THRESHOLD_HELP = ("Multi-label bundles: one score threshold (0 to 1) for every label instead of the per-label ones "
                  "stored in the bundle.")
CONFIG_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
# Option names other than the field's name with dashes (a bool that is a plain flag, a short name).
_OPTION_NAMES = {"train_bn": ("--train-bn",), "check_data": ("--check-data/--no-check-data",), "out": ("--out", "-o")}
# Fields the command line takes as paths; config.json keeps them as strings.
_PATH_FIELDS = {"out": Path, "weights": Path | None, "cache_dir": Path | None}
Command = TypeVar("Command", bound=Callable[..., Any])


def config_options(*names: str, first: tuple[str, ...] = (), **defaults: Any) -> Callable[[Command], Command]:
    """Give a command one option per named `TrainConfig` field, after its own parameters.

    The command receives them as keyword arguments (declare `**settings`); `defaults` replace a
    field's default where the command has its own (`out=Path("runs/graft")`). In `--help` they
    come after the command's arguments and the options named in `first`, before its other options.
    """
    hints = {**typing.get_type_hints(TrainConfig), **_PATH_FIELDS}

    def add_options(command: Command) -> Command:
        signature = inspect.signature(command, eval_str=True)
        parameters = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        leading = [p for p in parameters if not isinstance(p.default, typer.models.OptionInfo) or p.name in first]
        trailing = [p.replace(kind=p.KEYWORD_ONLY) for p in parameters if p not in leading]
        added = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[name],
                              default=config_option(name, *_OPTION_NAMES.get(name, ()), default=defaults.get(name, dataclasses.MISSING)))
            for name in names
        ]
        command.__signature__ = signature.replace(parameters=leading + added + trailing)  # type: ignore[attr-defined]
        command.__annotations__ = {**typing.get_type_hints(command), **{name: hints[name] for name in names}}
        return command

    return add_options


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
