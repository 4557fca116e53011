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

The grid's cells are torch's adaptive-average-pooling bins, computed with slices and means so
that the ONNX export (which has no adaptive pooling to a size that does not divide the map's)
runs the same arithmetic.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from graft.errors import ConfigError

POOLINGS = ("avg", "grid")
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


def feature_multiplier(pooling: str) -> int:
    """How many times wider than the backbone's own pooled features `pooling`'s output is."""
    return GRID_SIZE * GRID_SIZE if pooling == "grid" else 1


def pooling_of(model: nn.Module) -> str:
    """How `model` pools its last feature map: "grid" under a `GridPool`, else "avg"."""
    return "grid" if isinstance(getattr(model, "global_pool", None), GridPool) else "avg"


def supports_grid(model: nn.Module) -> bool:
    """Whether `model` pools its last feature map with a top-level timm global pool (EfficientNet,
    ResNet, MobileNet, RegNet...), which a grid can replace. Models that pool inside a head with
    more layers (ConvNeXt's norm after the pool) or over tokens (ViT) cannot."""
    from timm.layers import SelectAdaptivePool2d

    pool = getattr(model, "global_pool", None)
    return isinstance(pool, (SelectAdaptivePool2d, GridPool)) and isinstance(getattr(model, "classifier", None), nn.Identity)


def pooled_model(model: nn.Module, pooling: str, *, name: str = "the backbone") -> nn.Module:
    """`model` pooling its last feature map by `pooling`: the model itself where it already does,
    else a shallow copy whose `global_pool` is a `GridPool` (or timm's average again), sharing every
    other module (and so every weight) with `model`."""
    if pooling not in POOLINGS:
        raise ConfigError(f"--pooling: expected one of {', '.join(POOLINGS)}, got {pooling!r}")
    if pooling == "avg" and not isinstance(getattr(model, "global_pool", None), GridPool):
        return model
    if not supports_grid(model):
        raise ConfigError(
            f"--pooling grid: {name} ({type(model).__name__}) does not end in a global pool over a feature map "
            "that a grid can replace (a ViT pools tokens; ConvNeXt normalises after pooling); use --pooling avg"
        )
    from timm.layers import SelectAdaptivePool2d

    pooled = copy.copy(model)
    pooled._modules = dict(model._modules)  # its own child list; the children themselves are shared
    pooled.global_pool = GridPool() if pooling == "grid" else SelectAdaptivePool2d(pool_type="avg", flatten=True)
    return pooled
