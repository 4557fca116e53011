"""Device and numeric precision: which is used, and the context that applies it.

`precision="auto"` (the default) picks bf16 autocast where the hardware runs it natively (CUDA
with bf16, CPUs with AVX-512 BF16 / AMX) and fp32 elsewhere; for a training run on such a CPU,
`graft.speed.cpu_precision` then times the backbone in both and keeps the faster (bf16 ran
EfficientNet-Lite0 about 1.7x as fast as fp32 on one 2-core AVX-512 BF16 machine, and no faster
than fp32 with BatchNorm folded on an AVX-512 BF16 CPU without AMX). Every choice is recorded
(cache keys, bundles). bf16 stays within `BF16_TOLERANCE` of fp32 on real images
(tests/test_numerics.py checks it). Training there keeps the depthwise convolutions
that get gradients in fp32 (`train_depthwise_in_fp32`): their bf16 backward is the slow one.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

import torch
from torch import nn

from graft.choices import COMPILE_SETTINGS, PRECISIONS
from graft.errors import ConfigError



# `torch.compile` of the frozen backbone's forward (bench/compile_forward.py, EfficientNet-Lite0, 2
# CPU cores, bf16, channels_last, malloc thresholds raised as `load_backbone` does): 34 s to compile
# with inductor's caches off, then 0.92x the eager time per batch (0.96 in a second run), so it
# pays off after about 53 000 images (with glibc's default malloc thresholds eager pays for page
# faults and compiling pays off sooner: 69 s, 0.81x, 7 900 images). auto compiles on CPU from this many images through the frozen backbone.
# On CUDA it stays eager: on an H100 the compiled forward ran at 0.62x the eager time (Lite0,
# batch 256, 18 s to compile; break-even 920 000 images), but extraction from files there is fed
# at a fifth to a quarter of the eager forward's rate (bench/extraction.py --device cuda), so a
# faster forward does not shorten it (measured: 2 229 against 2 100 img/s with and without).
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
        raise ConfigError(f"{device!r} is not a device; use cpu, cuda, cuda:N or auto", parameter="device") from None
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
        raise ConfigError(f"expected one of {', '.join(PRECISIONS)}, got {precision!r}", parameter="precision")
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
        raise ConfigError(f"expected one of {', '.join(COMPILE_SETTINGS)}, got {setting!r}", parameter="compile")
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


def train_depthwise_in_fp32(network: nn.Module) -> int:
    """On a CPU under bf16 autocast, run the depthwise convolutions that autograd records in fp32.

    oneDNN's bf16 backward of a depthwise convolution is slower than its fp32 one on the 2-core
    AVX-512 BF16 machine of docs/benchmarks.md (a 5x5 one 2.4-4.7x; forward + backward of 3x3
    ones 0.65-1.5x), while pointwise convolutions are 1.6-1.7x faster in bf16. There, with batch
    32, EfficientNet-Lite0's full training step took 1.63 s in fp32, 1.80 s in bf16 autocast and
    1.18 s with its depthwise convolutions in fp32 and the rest in bf16; its top two stages on
    cached activations 0.32, 0.48 and 0.25 s (`bench/train_precision.py`). The forward alone is
    faster in bf16 (176 against 143 img/s), so a depthwise convolution keeps bf16 wherever no
    backward will follow: inference, and a frozen prefix that receives no gradient.

    Each depthwise `nn.Conv2d` (groups equal to its input channels) of `network` gets a forward
    that checks, per call, whether CPU autocast is on and autograd records the op (gradients
    enabled, and its weight or its input requires them); if so it runs in fp32 with autocast off,
    its output fp32 (the next layer's autocast casts it back). Weights and state_dict are
    untouched. Idempotent; returns how many convolutions it wraps (0 on a second call).
    """
    wrapped = 0
    for module in network.modules():
        if not _is_depthwise(module) or getattr(module, "_graft_fp32_when_trained", False):
            continue
        module.forward = functools.partial(_fp32_when_trained, module, module.forward)
        module._graft_fp32_when_trained = True
        wrapped += 1
    return wrapped


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def _fp32_when_trained(module: nn.Conv2d, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    if (
        x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and torch.is_grad_enabled()
        and (x.requires_grad or module.weight.requires_grad)
    ):
        with torch.autocast("cpu", enabled=False):
            return forward(x.float())
    return forward(x)
