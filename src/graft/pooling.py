"""How the backbone's last feature map becomes the head's input: its own average, or a grid.

A CNN backbone ends in a feature map (1280 x 7 x 7 for EfficientNet-Lite0 at 224 px) that timm
averages over space into one vector. That throws away where things are, which is what tells
classes apart when the objects are aligned in the frame: product thumbnails (a sandal's open
heel, a boot's shaft), digits, documents, X-rays, tiles. `pooling="grid"` averages each cell of a
`GRID_SIZE` x `GRID_SIZE` grid instead (spatial pyramid pooling's fixed level), so the head sees
the map's layout at GRID_SIZE**2 times the width.

Measured on 20-shot Fashion-MNIST (five seeds, the whole frame, frozen EfficientNet-Lite0,
scikit-learn's `LogisticRegression` at its default C on 200 training images; docs/benchmarks.md):
mean test accuracy 0.797 with the average, 0.813 / 0.817 with 2x2 / 3x3 grids. Where an object
can be anywhere in the frame (photos of ImageNet-like things) the average may be the better
summary (not measured: nothing offline is such a labelled set), so `auto` measures which fits the
data (`graft.strategies.auto.choose_pooling`).

`pooling="grid-2"` adds the same grid of the output of the stage before the last (`graft.stages`):
for EfficientNet-Lite0, `blocks.5` (192 x 7 x 7) beside the final 1 280-channel map, 13 248
features. The last stage and its 1x1 expansion are where the features become ImageNet's classes;
the stage before is more generic, which is what a distant domain needs. With scikit-learn's probe
on the same five tasks: mean validation / test accuracy 0.826 / 0.829 with `grid-2`, 0.812 /
0.817 with `grid`, 0.793 / 0.796 with the average.

The grid's cells are torch's adaptive-average-pooling bins, computed with slices and means so
that the ONNX export (which has no adaptive pooling to a size that does not divide the map's)
runs the same arithmetic.
"""

from __future__ import annotations

import copy
import weakref
from collections import OrderedDict

import torch
from torch import nn

from graft.errors import ConfigError

POOLINGS = ("avg", "grid", "grid-2")
GRID_SIZE = 3


class GridPool(nn.Module):
    """(N, C, H, W) -> (N, C * size * size): the mean of each cell of a size x size grid."""

    def __init__(self, size: int = GRID_SIZE) -> None:
        super().__init__()
        self.size = size

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        height, width = maps.shape[-2:]
        rows = [_bin(i, self.size, int(height)) for i in range(self.size)]
        columns = [_bin(j, self.size, int(width)) for j in range(self.size)]
        cells = [maps[:, :, r0:r1, c0:c1].mean(dim=(2, 3)) for r0, r1 in rows for c0, c1 in columns]
        # (N, C, size*size) flattened channel-major: adaptive_avg_pool2d(maps, size).flatten(1).
        return torch.stack(cells, dim=2).flatten(1)

    def extra_repr(self) -> str:
        return f"size={self.size}"


def _bin(index: int, cells: int, length: int) -> tuple[int, int]:
    """torch's adaptive-pooling bin: [floor(i * L / n), ceil((i + 1) * L / n))."""
    return (index * length) // cells, -(-((index + 1) * length) // cells)


class RecordingSequential(nn.Sequential):
    """An `nn.Sequential` over the same modules (same names, same weights) that also keeps the
    output of its module at `index` for the `LevelPool` that reads it in the same forward pass.

    (timm's `forward_intermediates` returns only its `feature_info` levels, for EfficientNet the
    ends of blocks 0, 1, 2, 4 and 6, not graft's stage before the last, `blocks.5`; and it is a
    second forward path, where this keeps the model's own, which the bundle and ONNX export run.)"""

    def __init__(self, modules: nn.Sequential, index: int) -> None:
        super().__init__(OrderedDict(modules._modules))  # the same names
        self.index = index
        self.recorded: torch.Tensor | None = None

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        for position, module in enumerate(self):
            value = module(value)
            if position == self.index:
                self.recorded = value
        return value

    def take(self) -> torch.Tensor:
        recorded, self.recorded = self.recorded, None  # not held past its forward pass
        if recorded is None:
            raise RuntimeError("grid-2 pooling: the earlier stage's output was not recorded in this forward pass")
        return recorded

    def extra_repr(self) -> str:
        return f"records the output of [{self.index}]"


class LevelPool(nn.Module):
    """The global pool of a `grid-2` model: a grid of the last map and of an earlier stage's output
    (recorded by `source` in the same forward pass), concatenated."""

    def __init__(self, source: RecordingSequential) -> None:
        super().__init__()
        object.__setattr__(self, "source", source)  # a module of the same model, not a child of this one

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return pool_maps("grid-2", maps, self.source.take())


def pool_maps(pooling: str, maps: torch.Tensor, earlier: torch.Tensor | None = None) -> torch.Tensor:
    """What a model pooling by `pooling` ("grid" or "grid-2") makes of its last feature map (and,
    for "grid-2", of the earlier stage's output): the same arithmetic as its `global_pool`, for
    pooling a pass's maps on the side (`graft.features.SidePooling`)."""
    grid = GridPool()
    if pooling == "grid":
        return grid(maps)
    if pooling == "grid-2" and earlier is not None:
        return torch.cat([grid(maps), grid(earlier)], dim=1)
    raise ValueError(f"pool_maps: cannot pool by {pooling!r}{' without the earlier output' if pooling == 'grid-2' else ''}")


def pooling_of(model: nn.Module) -> str:
    """How `model` pools its last feature map: "grid" or "grid-2" under graft's pools, else "avg"."""
    pool = getattr(model, "global_pool", None)
    return "grid-2" if isinstance(pool, LevelPool) else "grid" if isinstance(pool, GridPool) else "avg"


def supports_grid(model: nn.Module) -> bool:
    """Whether `model`'s output is its last feature map pooled by a top-level timm global pool,
    which a grid can replace (EfficientNet, ResNet...). Models that do more after the pool
    (MobileNetV3's 1x1 head convolution, ConvNeXt's norm) or pool tokens (ViT) cannot. Checked
    numerically on a small random batch, once per model: the output must be the pool of
    `forward_features`."""
    from timm.layers import SelectAdaptivePool2d

    model = _base(model)
    if model in _SUPPORTS_GRID:
        return _SUPPORTS_GRID[model]
    pool = getattr(model, "global_pool", None)
    supported = False
    if isinstance(pool, SelectAdaptivePool2d) and hasattr(model, "forward_features"):
        device = next(model.parameters(), torch.empty(0)).device
        probe = torch.randn((2, 3, 64, 64), generator=torch.Generator().manual_seed(0)).to(device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                output, pooled = model(probe), pool(model.forward_features(probe))
            supported = output.shape == pooled.shape and bool(torch.allclose(output, pooled, atol=1e-5, rtol=1e-4))
        except Exception:  # any shape or type mismatch: something else runs after the pool
            supported = False
        finally:
            model.train(was_training)
    _SUPPORTS_GRID[model] = supported
    return supported


_SUPPORTS_GRID: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def earlier_stage_output(model: nn.Module) -> tuple[str, int] | None:
    """Where `grid-2` reads the output of the stage before the last (`graft.stages`): a top-level
    `nn.Sequential` of `model` and the index of the module in it whose output that is; None when
    that output is not such a module's (then `grid-2` cannot be built without hooks)."""
    from graft.stages import discover_stages

    model = _base(model)
    stages = discover_stages(model)
    if len(stages) < 2 or not stages[-2].module_names:
        return None
    name = stages[-2].module_names[-1]
    parent, _, child = name.rpartition(".")
    container = model._modules.get(parent) if parent and "." not in parent else None
    if isinstance(container, nn.Sequential) and child.isdigit() and child in container._modules:
        return parent, list(container._modules).index(child)
    module = model._modules.get(name)
    if isinstance(module, nn.Sequential) and len(module) > 0:
        return name, len(module) - 1
    return None


def earlier_module_name(model: nn.Module) -> str | None:
    """The name of the module whose output `grid-2` reads beside the last map (None: it cannot)."""
    where = earlier_stage_output(model)
    if where is None:
        return None
    container, index = where
    return f"{container}.{list(_base(model)._modules[container]._modules)[index]}"


def pooled_model(model: nn.Module, pooling: str, *, name: str = "the backbone") -> nn.Module:
    """`model` pooling its last feature map by `pooling`: the original timm model for "avg", else a
    shallow copy whose `global_pool` is a `GridPool` (or, for "grid-2", a `LevelPool` reading a
    `RecordingSequential` copy of the container of the earlier stage's output), sharing every other
    module (and so every weight, under the same parameter names) with `model`."""
    if pooling not in POOLINGS:
        raise ConfigError(f"--pooling: expected one of {', '.join(POOLINGS)}, got {pooling!r}")
    base = _base(model)
    if pooling == "avg":
        return base
    if not supports_grid(base):
        raise ConfigError(
            f"--pooling {pooling}: {name} ({type(base).__name__}) does not end in a global pool over a feature map "
            "that a grid can replace (a ViT pools tokens; ConvNeXt normalises and MobileNetV3 convolves after "
            "pooling); use --pooling avg"
        )
    pooled = copy.copy(base)
    pooled._modules = dict(base._modules)  # its own child list; the children themselves are shared
    object.__setattr__(pooled, "_graft_base", base)  # what pooling="avg" gives back
    if pooling == "grid":
        pooled.global_pool = GridPool()
        return pooled
    where = earlier_stage_output(base)
    if where is None:
        raise ConfigError(
            f"--pooling grid-2: in {name} ({type(base).__name__}) the stage before the last does not end in a "
            "top-level sequential container, where graft reads its output; use --pooling grid"
        )
    container, index = where
    recording = RecordingSequential(base._modules[container], index)
    pooled._modules[container] = recording
    pooled.global_pool = LevelPool(recording)
    return pooled


def _base(model: nn.Module) -> nn.Module:
    return model.__dict__.get("_graft_base", model)


def pooled_width(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """The width of `model`'s pooled features (one forward pass of a blank image)."""
    device = next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return int(model(torch.zeros((1, *input_size), device=device)).shape[1])
    finally:
        model.train(was_training)
