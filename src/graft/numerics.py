"""Device and numeric precision: which is used, and the context that applies it.

`precision="auto"` picks bf16 autocast where the hardware runs it natively (CUDA with bf16, CPUs
with AVX-512 BF16 / AMX) and fp32 elsewhere. Every choice is recorded (cache keys, bundles).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from graft.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(device: str | None = None) -> torch.device:
    """`None`/"auto" → CUDA when available, else CPU; otherwise the device named."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device: {device!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is available here; use --device cpu")
    return resolved


def cpu_supports_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """The concrete precision ("fp32" or "bf16") for `precision` on `device`."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        if precision == "bf16" and device.type == "cpu" and not cpu_supports_bf16():
            raise ConfigError("--precision bf16: this CPU has no native bf16 support; use fp32")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """bf16 autocast for "bf16", nothing for "fp32"."""
    if precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield
