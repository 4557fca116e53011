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
data (`graft.strategies.auto_measure.choose_pooling`).

`pooling="grid-2"` adds the same grid of the output of the stage before the last (`graft.models.stages`):
for EfficientNet-Lite0, `blocks.5` (192 x 7 x 7) beside the final 1 280-channel map, 13 248
features. The last stage and its 1x1 expansion are where the features become ImageNet's classes;
the stage before is more generic, which is what a distant domain needs. With scikit-learn's probe
on the same five tasks: mean validation / test accuracy 0.826 / 0.829 with `grid-2`, 0.812 /
0.817 with `grid`, 0.793 / 0.796 with the average.

`pooling="grid-3"` adds the stage before that too (`blocks.4`, 112 x 14 x 14, on a 5 x 5 grid: its
map is twice as fine, 16 048 features in all). Same probe, same five tasks: 0.841 / 0.836 (a 3 x 3
grid of `blocks.4`: 0.831 / 0.833). Each level's grid size is `LEVEL_GRIDS`.

The grid's cells are torch's adaptive-average-pooling bins, computed with slices and means so
that the ONNX export (which has no adaptive pooling to a size that does not divide the map's)
runs the same arithmetic.
"""

from __future__ import annotations

import copy
import weakref
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from graft.choices import POOLINGS
from graft.errors import ConfigError
from graft.models.stages import discover_stages

GRID_SIZE = 3
# The grid of each level, the last map first: the stage before the last is as coarse as the last
# (7 x 7 in EfficientNet-Lite0), the one before that twice as fine (14 x 14), so finer cells.
LEVEL_GRIDS = (GRID_SIZE, GRID_SIZE, 5)


def levels(pooling: str) -> int:
    """How many stages' outputs `pooling` reads: 0 for "avg", 1 for "grid", N for "grid-N"."""
    return 0 if pooling == "avg" else 1 if pooling == "grid" else int(pooling.rpartition("-")[2])


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
    outputs of its modules at `indices` for the `LevelPool` that reads them in the same forward pass.

    (timm's `forward_intermediates` returns only its `feature_info` levels, for EfficientNet the
    ends of blocks 0, 1, 2, 4 and 6, not graft's stage before the last, `blocks.5`; and it is a
    second forward path, where this keeps the model's own, which the bundle and ONNX export run.)"""

    def __init__(self, modules: nn.Sequential, indices: tuple[int, ...]) -> None:
        super().__init__(OrderedDict(modules._modules))  # the same names
        self.indices = tuple(indices)
        self.recorded: dict[int, torch.Tensor] = {}

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        for position, module in enumerate(self):
            value = module(value)
            if position in self.indices:
                self.recorded[position] = value
        return value

    def take(self, index: int) -> torch.Tensor:
        recorded = self.recorded.pop(index, None)  # not held past its forward pass
        if recorded is None:
            raise RuntimeError(f"grid pooling: the output of [{index}] was not recorded in this forward pass")
        return recorded

    def extra_repr(self) -> str:
        return f"records the output of {', '.join(f'[{i}]' for i in self.indices)}"


class LevelPool(nn.Module):
    """The global pool of a `grid-2` or `grid-3` model: grids of the last map and of earlier stages'
    outputs (recorded by `sources`, (container, index) pairs, in the same forward pass), concatenated."""

    def __init__(self, sources: list[tuple[RecordingSequential, int]]) -> None:
        super().__init__()
        # Modules of the same model, not children of this one.
        object.__setattr__(self, "sources", list(sources))

    @property
    def pooling(self) -> str:
        return f"grid-{1 + len(self.sources)}"

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return pool_maps(self.pooling, maps, [source.take(index) for source, index in self.sources])


def pool_maps(pooling: str, maps: torch.Tensor, earlier: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """What a model pooling by `pooling` ("grid", "grid-2", "grid-3") makes of its last feature map
    and of the earlier stages' outputs (`earlier`, the nearest first; `earlier_module_names`): the
    same arithmetic as its `global_pool`, for pooling a pass's maps on the side
    (`graft.training.features.SidePooling`)."""
    count = levels(pooling) if pooling in POOLINGS else 0
    if count == 0 or len(earlier) != count - 1:
        raise ValueError(f"pool_maps: cannot pool by {pooling!r} with {len(earlier)} earlier outputs")
    return torch.cat([GridPool(size)(level) for size, level in zip(LEVEL_GRIDS, (maps, *earlier))], dim=1)


def pooling_of(model: nn.Module) -> str:
    """How `model` pools its last feature map: "grid", "grid-2" or "grid-3" under graft's pools, else "avg"."""
    pool = getattr(model, "global_pool", None)
    return pool.pooling if isinstance(pool, LevelPool) else "grid" if isinstance(pool, GridPool) else "avg"


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


def earlier_stage_outputs(model: nn.Module, count: int) -> list[tuple[str, int]] | None:
    """Where `grid-(count + 1)` reads the outputs of the `count` stages before the last
    (`graft.models.stages`), the nearest first: for each, a top-level `nn.Sequential` of `model` and the
    index of the module in it whose output that is; None when one of them is not such a module's
    (then that pooling cannot be built without hooks)."""

    model = _base(model)
    stages = discover_stages(model)
    if len(stages) < count + 1:
        return None
    found = []
    for stage in reversed(stages[-1 - count:-1]):
        if not stage.module_names:
            return None
        name = stage.module_names[-1]
        parent, _, child = name.rpartition(".")
        container = model._modules.get(parent) if parent and "." not in parent else None
        module = model._modules.get(name)
        if isinstance(container, nn.Sequential) and child.isdigit() and child in container._modules:
            found.append((parent, list(container._modules).index(child)))
        elif isinstance(module, nn.Sequential) and len(module) > 0:
            found.append((name, len(module) - 1))
        else:
            return None
    return found


def earlier_module_names(model: nn.Module, pooling: str) -> tuple[str, ...] | None:
    """The names of the modules whose outputs `pooling` reads beside the last map, the nearest
    first (() for "avg" and "grid"; None: the model cannot pool so)."""
    where = earlier_stage_outputs(model, max(levels(pooling) - 1, 0))
    if where is None:
        return None
    base = _base(model)
    return tuple(f"{container}.{list(base._modules[container]._modules)[index]}" for container, index in where)


def pooled_model(model: nn.Module, pooling: str, *, name: str = "the backbone") -> nn.Module:
    """`model` pooling its last feature map by `pooling`: the original timm model for "avg", else a
    shallow copy whose `global_pool` is a `GridPool` (or, for "grid-2" and "grid-3", a `LevelPool`
    reading `RecordingSequential` copies of the containers of the earlier stages' outputs), sharing
    every other module (and so every weight, under the same parameter names) with `model`."""
    if pooling not in POOLINGS:
        raise ConfigError(f"expected one of {', '.join(POOLINGS)}, got {pooling!r}", parameter="pooling")
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
    where = earlier_stage_outputs(base, levels(pooling) - 1)
    if where is None:
        raise ConfigError(
            f"--pooling {pooling}: in {name} ({type(base).__name__}) the {levels(pooling) - 1} stage(s) before the last do "
            "not each end in a top-level sequential container, where graft reads their outputs; use --pooling grid"
        )
    recordings = {
        container: RecordingSequential(base._modules[container], tuple(i for c, i in where if c == container))
        for container in dict.fromkeys(c for c, _ in where)
    }
    pooled._modules.update(recordings)
    pooled.global_pool = LevelPool([(recordings[container], index) for container, index in where])
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
