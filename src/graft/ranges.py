"""The accepted range of every numeric option, and the one check they all go through.

`TrainConfig` maps its fields to these ranges (`graft.config.NUMBER_RANGES`); `predict`,
`evaluate`, `serve` and the other commands check their own numbers with `check_number` and the
ranges below. A value is refused when it is not a number of the right kind (a whole number where
one is needed; never a bool or a string), not finite (nan, inf), or outside its range; the
`ConfigError` names the parameter and gives the range (the CLI shows the flag instead of `lr`):

    lr: expected a finite number in (0, 10], got inf

The bounds keep every value where the code that uses it works: a seed NumPy and torch accept,
a resize side (input / crop_pct) that fits in memory, a batch that fits in memory, a rate at
which AdamW does not overflow in the first step.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from graft.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """The values one option accepts: `kind` int or float, from `low` to `high`.

    `low_open`/`high_open` leave the bound itself out; `optional` lets `None` through (it means
    "the default" where the option says so); `hint` follows the range in the message.
    """

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    hint: str = ""

    def contains(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def describe(self) -> str:
        if self.kind is int:
            if self.high is None:
                text = f"a whole number of {_bound(self.low, '-inf')} or more"
            else:
                text = f"a whole number from {_bound(self.low, '-inf')} to {_bound(self.high, 'inf')}"
        else:
            low = "(" if self.low_open else "["
            high = ")" if self.high_open else "]"
            text = f"a finite number in {low}{_bound(self.low, '-inf')}, {_bound(self.high, 'inf')}{high}"
        return f"{text} {self.hint}" if self.hint else text


def _bound(value: float | None, infinite: str) -> str:
    if value is None:
        return infinite
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def check_number(parameter: str, value: object, allowed: Range) -> int | float | None:
    """`value` as a plain `int` or `float` when `allowed` takes it; else `ConfigError` naming `parameter`.

    NumPy scalars are accepted and returned as Python numbers; an int is accepted where a float is
    expected (and returned as a float).

    >>> check_number("lr", 1e-3, Range(float, 0, 10, low_open=True))
    0.001
    """
    if value is None and allowed.optional:
        return None
    refused = ConfigError(f"expected {allowed.describe()}, got {_shown(value)}", parameter=parameter)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise refused
    if allowed.kind is int:
        if not isinstance(value, numbers.Integral):
            raise refused
        number: int | float = int(value)
    else:
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float
            raise refused from None
        if not math.isfinite(number):
            raise refused
    if not allowed.contains(number):
        raise refused
    return number


def _shown(value: object) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


EPOCHS_MAX = 100_000

# Shared by training, predict, evaluate and compare: a batch of 4096 images at 224 px is 2.5 GB
# of float input; a larger one only costs memory (predict holds a whole batch of decoded images).
BATCH_SIZE = Range(int, 1, 4096)
SEED = Range(int, 0, 2**32 - 1, hint="(NumPy's seed range)")
TOP_K = Range(int, 1, 10_000)
PORT = Range(int, 0, 65535)
UPLOAD_MB = Range(float, 0.001, 1024, hint="(MiB)")
UPLOAD_BYTES = Range(int, 1, 1024 * 2**20)
IMAGES_PER_REQUEST = Range(int, 1, 1024)
CLASS_COUNT = Range(int, 1, 1_000_000)
