"""BatchNorm folded into the convolution before it, for inference through frozen weights.

In eval mode a BatchNorm layer is a fixed per-channel affine map, so after a convolution it can be
folded into that convolution's weights and bias (`torch.nn.utils.fusion.fuse_conv_bn_eval`) and
cost nothing. Eager PyTorch does not do this by itself: every BatchNorm is one more pass over the
activations. On EfficientNet-Lite0 (49 convolution + BatchNorm pairs, 2-core AVX-512 CPU, batch 64,
channels_last, fp32) the folded forward runs 1.20x as fast as the eager one (`bench/extraction.py`
measures both, docs/benchmarks.md). graft folds for fp32 inference only: in bf16 the folded
weights, rounded after scaling, moved EfficientNet-Lite0's ImageNet logits 0.045 from fp32 where
the eager bf16 forward moves them 0.035, too close to `numerics.BF16_TOLERANCE`.

Which pairs fold is not guessed from module names or registration order: one forward pass with
hooks records, for every BatchNorm, whether its input *is* the output tensor of a convolution
(same object), each called once. The folded copy is then checked against the model's own fp32
forward on the same probe; if any convolution's output also fed something else (a skip branch),
the outputs would differ and the model is used unfolded. The original model is never changed:
its weights are what trains and what a bundle stores. (torch's own `torch.fx.experimental.
optimization.fuse` needs a model that `torch.fx` can trace; on the bundled EfficientNet-Lite0 its
trace fails at the "same" padding's control flow, so it folds nothing there.)
"""

from __future__ import annotations

import copy
import os
import threading
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

# fp32 folding moves the Lite0 features by about 2e-6 relative (max 1.5e-5 absolute); a wrong fold
# (a convolution's output used beside its BatchNorm) moves them by orders of magnitude more. The
# absolute part scales with the outputs' largest magnitude (at least 1): fp32 rounding does too.
FOLD_TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


def same_outputs(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether a folded model's outputs are its original's, within `FOLD_TOLERANCE`."""
    if actual.shape != expected.shape:
        return False
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    return torch.allclose(actual, expected, rtol=FOLD_TOLERANCE["rtol"], atol=FOLD_TOLERANCE["atol"] * scale)


def foldable_pairs(model: nn.Module, probe: torch.Tensor) -> list[tuple[str, str]]:
    """(conv name, BatchNorm name) pairs whose BatchNorm input is exactly the convolution's output.

    Found by running `probe` through `model` (eval mode, no grad) with hooks; only BatchNorm kinds
    whose forward is known to be "normalise, then the rest" are considered (`_rest_of`).
    """
    names = {module: name for name, module in model.named_modules()}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and _rest_of(m) is not None]
    if not convs or not norms:
        return []
    calls: dict[nn.Module, int] = {}
    produced_by: dict[int, nn.Module] = {}
    outputs: list[torch.Tensor] = []  # kept alive so that no id is reused during the pass
    fed_by: dict[nn.Module, nn.Module | None] = {}

    def after_conv(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        calls[module] = calls.get(module, 0) + 1
        outputs.append(output)
        produced_by[id(output)] = module

    def before_norm(module: nn.Module, inputs: tuple) -> None:
        calls[module] = calls.get(module, 0) + 1
        source = produced_by.get(id(inputs[0])) if inputs else None
        fed_by[module] = source if module not in fed_by else None  # a second call: not foldable

    handles = [c.register_forward_hook(after_conv) for c in convs]
    handles += [n.register_forward_pre_hook(before_norm) for n in norms]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    pairs = []
    for norm, conv in fed_by.items():
        if conv is not None and calls.get(conv) == 1 and calls.get(norm) == 1:
            pairs.append((names[conv], names[norm]))
    return pairs


def fold_batchnorm(model: nn.Module, probe: torch.Tensor) -> nn.Module:
    """An eval-mode copy of `model` with every foldable BatchNorm folded into its convolution.

    Returns `model` itself (unchanged) when nothing folds or when the folded copy does not give
    the model's own fp32 outputs on `probe` within `FOLD_TOLERANCE`. For inference only: the copy
    shares nothing with `model`, so training `model` afterwards does not reach it.
    """
    pairs = foldable_pairs(model, probe)
    if not pairs:
        return model
    was_training = model.training
    try:
        folded = copy.deepcopy(model).eval()
        for conv_name, norm_name in pairs:
            conv, norm = folded.get_submodule(conv_name), folded.get_submodule(norm_name)
            rest = _rest_of(norm)
            assert rest is not None  # foldable_pairs only pairs known kinds
            _replace(folded, conv_name, fuse_conv_bn_eval(conv, norm))
            _replace(folded, norm_name, rest)
        model.eval()
        with torch.no_grad(), torch.autocast(probe.device.type, enabled=False):
            expected, actual = model(probe), folded(probe)
    except Exception:  # folding is an optimisation: a model it cannot copy or run runs as it is
        return model
    finally:
        model.train(was_training)
    if not (isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor) and same_outputs(actual, expected)):
        return model
    return folded.requires_grad_(False)


@dataclass
class _Folded:
    module: nn.Module | None  # None: nothing folds, the model runs as it is
    versions: tuple[int, ...]  # (data_ptr, version) of every parameter and buffer
    device: torch.device


# One folded copy per model, reused while the model's weights are unchanged (the tensors' storages,
# and their version counters: every in-place update, an optimizer step or a load_state_dict, bumps
# them) and the model stays on the same device. A backbone that is fine-tuned after extracting features is
# folded again the next time it extracts.
_FOLDED: "weakref.WeakKeyDictionary[nn.Module, _Folded]" = weakref.WeakKeyDictionary()
_FOLDING = threading.Lock()


def folded_for_inference(model: nn.Module, input_size: tuple[int, ...]) -> nn.Module:
    """`fold_batchnorm(model)` with a random probe of `input_size` (C, H, W), cached per model.

    `GRAFT_FOLD_BATCHNORM=0` in the environment turns folding off (the model is returned as is).
    """
    if os.environ.get("GRAFT_FOLD_BATCHNORM", "1") == "0":
        return model
    tensors = [*model.parameters(), *model.buffers()]
    # A tensor replaced (`.data =`, `.to()`) has a new storage; one updated in place a new version.
    versions = tuple(v for t in tensors for v in (t.data_ptr(), t._version))
    device = tensors[0].device if tensors else torch.device("cpu")
    with _FOLDING:  # the probe's hooks sit on the shared model: one fold at a time
        entry = _FOLDED.get(model)
        if entry is None or entry.versions != versions or entry.device != device:
            generator = torch.Generator().manual_seed(0)
            probe = torch.randn((2, *input_size), generator=generator).to(device)
            if device.type == "cpu":
                probe = probe.contiguous(memory_format=torch.channels_last)
            folded = fold_batchnorm(model, probe)
            # Never the model itself as the value: it would keep its own weak key alive forever.
            entry = _Folded(None if folded is model else folded, versions, device)
            _FOLDED[model] = entry
    return entry.module if entry.module is not None else model


def inference_network(model: nn.Module, input_size: tuple[int, ...], precision: str) -> nn.Module:
    """What runs `model`'s inference in `precision`: in fp32 its folded copy (`folded_for_inference`),
    otherwise the model itself (folding is exact in fp32 only). Call it outside inference mode: the
    folded copy's weights must stay ordinary tensors. `input_size` is what one input is, (C, H, W)."""
    return folded_for_inference(model, input_size) if precision == "fp32" else model


def _rest_of(norm: nn.BatchNorm2d) -> nn.Module | None:
    """What `norm`'s forward does after normalising, as a module; None for kinds not known here.

    Plain `BatchNorm2d` does nothing more; timm's `BatchNormAct2d` applies its dropout and its
    activation. Only eval-mode normalisation by running statistics can fold.
    """
    if norm.running_mean is None or norm.running_var is None:
        return None
    if type(norm) is nn.BatchNorm2d:
        return nn.Identity()
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    if type(norm) is BatchNormAct2d:
        return nn.Sequential(norm.drop, norm.act)
    return None


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
