"""Device and numeric precision: which is used, and the context that applies it.

`precision="auto"` (the default) picks bf16 autocast where the hardware runs it natively (CUDA
with bf16, CPUs with AVX-512 BF16 / AMX) and fp32 elsewhere. Every choice is recorded (cache keys,
bundles). On the 2-core AVX-512 machine of docs/performance.md, bf16 autocast with channels_last
runs EfficientNet-Lite0 about 2x faster than fp32, and stays within `BF16_TOLERANCE` of fp32 on
real images (tests/test_numerics.py checks it).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from graft.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")
COMPILE_SETTINGS = ("auto", "on", "off")

# `torch.compile` of the frozen backbone's forward (bench/compile_cpu.py, EfficientNet-Lite0, 2 CPU
# cores, bf16, channels_last, malloc thresholds raised as `load_backbone` does): 34 s to compile
# with inductor's caches off, then 0.92x the eager time per batch (0.96 in a second run), so it
# pays off after about 53 000 images. (Before the malloc fix eager paid for page faults: 69 s,
# 0.81x, 7 900 images.) auto compiles on CPU from this many images through the frozen backbone;
# on CUDA the break-even has not been measured, so auto leaves it eager.
COMPILE_BREAK_EVEN_IMAGES = 50_000

# How far bf16 autocast may move results from fp32, measured on real images (docs/performance.md):
# - pooled features: relative L2 error (measured 0.035 on foolbox's ImageNet JPEGs);
# - ImageNet top-1: agreement with fp32 and largest change of a class probability (measured 20/20
#   and 0.035 with the pretrained EfficientNet-Lite0 classifier);
# - a few-shot head (20-shot Fashion-MNIST, probe fitted on fp32 features, 1 000 validation images):
#   top-1 agreement (measured 0.987) and accuracy change (measured +0.004).
BF16_TOLERANCE = {
    "feature_relative_error": 0.05,
    "imagenet_top1_agreement": 0.95,
    "imagenet_max_prob_diff": 0.06,
    "fewshot_top1_agreement": 0.97,
    "fewshot_accuracy_diff": 0.01,
}


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


def should_compile(setting: str, images: int, device: torch.device) -> bool:
    """Whether to `torch.compile` the frozen backbone for a run that sends `images` through it."""
    if setting not in COMPILE_SETTINGS:
        raise ConfigError(f"--compile: expected one of {', '.join(COMPILE_SETTINGS)}, got {setting!r}")
    if setting != "auto":
        return setting == "on"
    return device.type == "cpu" and images >= COMPILE_BREAK_EVEN_IMAGES


def inference_precision(trained_with: str | None, device: torch.device) -> str:
    """The precision to predict in with a model trained in `trained_with` (a bundle's record).

    A bf16-trained head was fitted on bf16 features, so prediction uses bf16 too wherever the
    device runs it natively; elsewhere (and for fp32 or unknown records) fp32, which is within
    `BF16_TOLERANCE` of it.
    """
    if trained_with != "bf16":
        return "fp32"
    return resolve_precision("auto", device)


@contextlib.contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Run torch ops with `count` intra-op threads inside the block, then restore the setting.

    For small work (a linear head on cached features: 32x1280 matmuls, an AdamW step on 13k
    weights) one thread is several times faster than two: the op is shorter than the cost of
    waking and joining OpenMP threads, and much shorter when other processes hold the cores.
    """
    before = torch.get_num_threads()
    if count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """bf16 autocast for "bf16", nothing for "fp32"."""
    if precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield
