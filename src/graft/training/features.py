"""Frozen-backbone features, computed once and cached on disk.

A cached feature is keyed by the backbone (architecture + weights hash), the preprocessing, the
precision it was computed in, and the image file's content (not its name): renaming or moving a
file reuses its feature, changing a single byte or the preprocessing does not. Augmented views
are keyed by the augmentation, the seed and the view number too.

The cache is a folder of safetensors shards per backbone key, written atomically; a run adds one
shard with what it computed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from torch.utils.hooks import RemovableHandle

from graft.atomic import atomic_path
from graft.input.images import load_image
from graft.input.pipeline import default_batch_size, extraction_workers, image_batches, preprocessing_id
from graft.input.preprocessing import Preprocessing, build_transforms
from graft.models.backbones import Backbone
from graft.models.pooling import pool_maps
from graft.speed.folding import inference_network
from graft.speed.numerics import autocast
from graft.training import distributed

FEATURE_FORMAT = 1


def default_cache_dir() -> Path:
    """`$GRAFT_CACHE_DIR`, else `$XDG_CACHE_HOME/graft`, else `~/.cache/graft`."""
    if os.environ.get("GRAFT_CACHE_DIR"):
        return Path(os.environ["GRAFT_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "graft"


def backbone_key(backbone: Backbone, preprocessing: Preprocessing, precision: str, part: str = "pooled") -> str:
    """What makes two features comparable: same weights, preprocessing, precision and output.

    `part` names what was cached: the pooled features, or the output of a frozen prefix.
    """
    payload = {
        "part": part,
        "format": FEATURE_FORMAT,
        "architecture": backbone.architecture,
        "weights": backbone.weights_id,
        "preprocessing": preprocessing.to_dict(),
        "precision": precision,
    }
    if part == "pooled":
        del payload["part"]  # keeps the keys of caches written before prefixes were cached
        if backbone.pooling != "avg":
            payload["pooling"] = backbone.pooling  # the average's keys stay those of caches written before
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


@dataclass
class FeatureCache:
    """Feature vectors on disk under `root/<backbone key>/`, looked up by item key."""

    root: Path
    key: str
    _index: dict[str, Path] | None = field(default=None, repr=False)

    @property
    def folder(self) -> Path:
        return self.root / "features" / self.key

    def _load_index(self) -> dict[str, Path]:
        if self._index is None:
            from safetensors import safe_open

            self._index = {}
            if self.folder.is_dir():
                for shard in sorted(self.folder.glob("*.safetensors")):
                    try:
                        with safe_open(str(shard), framework="pt") as handle:
                            for name in handle.keys():
                                self._index[name] = shard
                    except Exception:  # a damaged shard is ignored; its items are recomputed
                        continue
        return self._index

    def get(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        index = self._load_index()
        by_shard: dict[Path, list[str]] = {}
        for key in keys:
            if key in index:
                by_shard.setdefault(index[key], []).append(key)
        found: dict[str, torch.Tensor] = {}
        for shard, names in by_shard.items():
            with safe_open(str(shard), framework="pt") as handle:
                for name in names:
                    found[name] = handle.get_tensor(name)
        return found

    def put(self, features: dict[str, torch.Tensor]) -> None:
        if not features:
            return
        from safetensors.torch import save_file


        self.folder.mkdir(parents=True, exist_ok=True)
        shard = self.folder / f"{uuid.uuid4().hex}.safetensors"
        with atomic_path(shard) as temporary:
            save_file({k: v.contiguous() for k, v in features.items()}, str(temporary))
        index = self._load_index()
        for key in features:
            index[key] = shard


class ImageFiles(Dataset):
    """Image files → tensors through a transform (decoding through `load_image`)."""

    def __init__(self, paths: Sequence[Path], transform: Callable) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(load_image(self.paths[index]))


@dataclass
class Tap:
    """The output of one module of the backbone, kept while its pooled features are computed.

    A strategy that trains on cached outputs of a frozen prefix ending at this module often needs
    the pooled features of the same images first (auto's framing, lp-ft's probe); keeping the
    prefix's outputs from that pass spares a second pass over them (`strategies.base.with_prefix_tap`).
    `outputs` maps each computed image's item key to the module's output for it (items found in
    the cache were not run, so they have none).
    """

    module_name: str
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class SidePooling:
    """Another pooling of the same last feature map, computed in the same pass and cached.

    auto compares the backbone's average with grids of it (`graft.models.pooling`) on the same images;
    pooling the maps the average pass already computed spares another pass of the whole backbone
    over them. `pooling` ("grid", "grid-2", "grid-3") runs on the input of the backbone's
    `global_pool` (the last feature map) and, for "grid-2" and "grid-3", on the outputs of the
    modules named `earlier` (`graft.models.pooling.earlier_module_names`); its outputs go into `cache`
    under the same item keys as the pass's own features.
    """

    pooling: str
    cache: FeatureCache
    earlier: tuple[str, ...] = ()


@dataclass
class ExtractionStats:
    computed: int = 0
    from_cache: int = 0
    compiled: bool = False  # the batches ran through torch.compile'd code


def extract_features(
    backbone: Backbone,
    paths: Sequence[Path],
    digests: Sequence[str],
    *,
    cache: FeatureCache | None,
    precision: str = "fp32",
    device: torch.device | None = None,
    batch_size: int | None = None,
    augment: str = "none",
    view: int = 0,
    seed: int = 0,
    num_workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    stats: ExtractionStats | None = None,
    model: nn.Module | None = None,
    compile: bool = False,
    tap: Tap | None = None,
    side_poolings: Sequence[SidePooling] = (),
) -> torch.Tensor:
    """Pooled features (N, D) of the images, from the cache where present, else computed.

    `augment`/`view`/`seed` select one augmented view (`augment="none"` is the plain evaluation
    view). `progress(n)` is called with the number of images done after each batch.
    Images are decoded one batch ahead in a background thread (`num_workers=0`) or in that many
    worker processes; `num_workers=None` picks for the device (`extraction_workers`: the thread on
    a CPU, whose cores the model needs; processes on all but one core on a GPU, which would
    otherwise wait for one thread's decoding). `batch_size=None` picks one for the device
    (`default_batch_size`).
    `compile=True` runs the batches through `torch.compile` (see `numerics.should_compile`). `tap`
    keeps the output of one of the backbone's modules for every computed image, and `side_poolings`
    pool its last feature map another way too, cached (`SidePooling`); both only where the whole
    backbone runs eagerly (with `model` or `compile`, neither happens).
    """
    device = device or torch.device("cpu")
    keys = [item_key(d, augment, view, seed) for d in digests]
    cached = cache.get(keys) if cache is not None else {}
    todo = [i for i, key in enumerate(keys) if key not in cached]
    _count_cached(stats, progress, cached=len(keys) - len(todo), todo=len(todo))
    computed: dict[str, torch.Tensor] = {}
    if todo:
        mine = distributed.shard(todo)  # under torchrun each rank computes a strided share, gathered below
        loader = _image_loader(backbone, [paths[i] for i in mine], [digests[i] for i in mine], augment=augment, view=view,
                               seed=seed, batch_size=batch_size or default_batch_size(device), num_workers=num_workers, device=device)
        network = _network(model if model is not None else backbone.model, backbone, precision, device)
        whole_eager = model is None and not compile  # what the hooks need: the backbone's own modules, run eagerly
        tapped, side_outputs, hooks = _hooks(network, tap if whole_eager else None, side_poolings if whole_eager else ())
        try:
            outputs = forward_batches(network, loader, precision=precision, device=device, progress=progress, compile=compile)
        finally:
            for hook in hooks:
                hook.remove()
        _keep_hooked_outputs([keys[index] for index in mine], tap, tapped, side_poolings, side_outputs)
        if stats is not None and compile:
            stats.compiled = stats.compiled or _ran_compiled(network)
        computed = distributed.gather_shards({keys[index]: outputs[position] for position, index in enumerate(mine)})
        if cache is not None and distributed.is_main():
            cache.put(computed)
    stacked = [cached[k] if k in cached else computed[k] for k in keys]
    return torch.stack(stacked) if stacked else torch.empty(0, backbone.num_features)


def _count_cached(stats: ExtractionStats | None, progress: Callable[[int], None] | None, *, cached: int, todo: int) -> None:
    if stats is not None:
        stats.from_cache += cached
        stats.computed += todo
    if progress and cached:
        progress(cached)


def _network(network: nn.Module, backbone: Backbone, precision: str, device: torch.device) -> nn.Module:
    """The network extraction runs: in fp32 a copy with BatchNorm folded into the convolutions."""
    if precision == "fp32":  # exact there (2e-6 relative); in bf16 folding loses accuracy (graft.speed.folding)
        network.eval().to(device)  # as forward_batches leaves it; the folded copy is made there
    return inference_network(network, backbone.preprocessing.input_size, precision)


def _ran_compiled(network: nn.Module) -> bool:
    used = compiled_forward(network)
    return used is not None and used.batch_size is not None


def _image_loader(
    backbone: Backbone, paths: Sequence[Path], digests: Sequence[str], *, augment: str, view: int, seed: int,
    batch_size: int, num_workers: int | None, device: torch.device,
) -> Iterable[torch.Tensor]:
    """The images' batches for one view, decoded at the model's size, one batch ahead."""
    transform = build_transforms(backbone.preprocessing, augment=augment)
    if augment != "none":
        # Seeding the three random sources timm's transforms use (torch: crops and flips;
        # random: RandAugment's magnitudes; NumPy: RandAugment's choice of operations) makes
        # every view reproducible: in the one decoding thread, drawn in order; in worker
        # processes (GPU), DataLoader seeds each worker's three from torch's generator, so the
        # same number of processes draws the same.
        torch.manual_seed(seed * 7919 + view)
        random.seed(seed * 7919 + view)
        np.random.seed(seed * 7919 + view)
    # Only the deterministic evaluation view may be kept decoded in memory and reused.
    view_id = preprocessing_id(backbone.preprocessing) if augment == "none" else None
    return image_batches(
        list(paths),
        transform,
        batch_size=batch_size,
        keys=[f"{digest}.{view_id}" for digest in digests] if view_id else None,
        workers=extraction_workers(len(paths), device) if num_workers is None else num_workers,
        device=device,
        min_size=backbone.preprocessing.resize_size,
    )


def _hooks(
    network: nn.Module, tap: Tap | None, side_poolings: Sequence[SidePooling],
) -> tuple[list[torch.Tensor], list[list[torch.Tensor]], list[RemovableHandle]]:
    """Forward hooks that keep `tap`'s module output and pool the last map for each side pooling.

    Returns the lists the hooks fill (tapped outputs; one list per side pooling) and the hooks.
    """
    tapped: list[torch.Tensor] = []
    side_outputs: list[list[torch.Tensor]] = [[] for _ in side_poolings]
    hooks: list[RemovableHandle] = []
    if tap is not None:
        # By name on the network that runs (the folded copy in fp32, whose module of that name
        # computes the same output: folding keeps the module tree and changes only the weights).
        # A copy: the next module may work in place on its input.
        def keep(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            tapped.append(output.to("cpu", copy=True))

        hooks.append(network.get_submodule(tap.module_name).register_forward_hook(keep))
    if side_poolings:
        earlier: dict[str, torch.Tensor] = {}  # this batch's output of each module a side pooling reads

        def keep_earlier(name: str) -> Callable:
            def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
                earlier[name] = output
            return hook

        # Inside the forward pass, so under its autocast: the same arithmetic as a backbone
        # whose global_pool is that pooling.
        def pool_sideways(_module: nn.Module, inputs: tuple) -> None:
            for side, kept in zip(side_poolings, side_outputs):
                pooled = pool_maps(side.pooling, inputs[0], [earlier[name] for name in side.earlier])
                kept.append(pooled.float().cpu())
            earlier.clear()

        for name in {name for side in side_poolings for name in side.earlier}:
            hooks.append(network.get_submodule(name).register_forward_hook(keep_earlier(name)))
        hooks.append(network.get_submodule("global_pool").register_forward_pre_hook(pool_sideways))
    return tapped, side_outputs, hooks


def _keep_hooked_outputs(
    keys: Sequence[str], tap: Tap | None, tapped: list[torch.Tensor],
    side_poolings: Sequence[SidePooling], side_outputs: list[list[torch.Tensor]],
) -> None:
    """The hooks' outputs, by item key: into `tap.outputs`, and into each side pooling's cache."""
    if tapped and tap is not None:
        for key, output in zip(keys, torch.cat(tapped)):
            tap.outputs[key] = output
    for side, kept in zip(side_poolings, side_outputs):
        if kept:
            pooled = distributed.gather_shards(dict(zip(keys, torch.cat(kept))))
            if distributed.is_main():
                side.cache.put(pooled)


def forward_batches(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    precision: str,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
    compile: bool = False,
) -> torch.Tensor:
    """Run `model` in eval mode over the batches; float32 outputs stacked on the CPU.

    With `compile=True` batches go through `torch.compile(model)`, compiled once per model for the
    first batch size seen and kept; a batch of another size (a last, partial one) runs eagerly
    rather than paying for a second compilation. If compiling fails (no C++ compiler, an
    unsupported op) a warning says so and the run goes on eagerly.
    """
    # Moving the weights must happen outside inference mode, or they become inference tensors
    # that can never train again (the same backbone may be fine-tuned after extraction).
    model.eval().to(device)
    model.to(memory_format=torch.channels_last)
    compiled = _compiled(model) if compile else None
    outputs = []
    with torch.inference_mode():
        for batch in batches:
            batch = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with autocast(precision, device):
                if compiled is not None and compiled.batch_size in (None, len(batch)):
                    try:
                        out = compiled.module(batch)
                        compiled.batch_size = len(batch)
                    except Exception as error:  # compiling is an optimisation: never fail the run for it
                        import warnings

                        warnings.warn(f"torch.compile failed ({type(error).__name__}: {error}); running eagerly instead", stacklevel=2)
                        _remember_compiled(model, _Compiled(None))
                        compiled = None
                        out = model(batch)
                else:
                    out = model(batch)
            outputs.append(out.float().cpu())
            if progress:
                progress(len(batch))
    return torch.cat(outputs) if outputs else torch.empty(0)


@dataclass
class _Compiled:
    """A model's compiled forward, kept on the model itself so that a run's several extraction
    passes compile only once. (A global table keyed by the model would never free it: the compiled
    wrapper holds the model. On the model, the two form a cycle that dies with the model.)"""

    module: nn.Module | None  # None: compiling failed for this model, stay eager
    batch_size: int | None = None  # the batch size it was compiled for, once it ran

    def __deepcopy__(self, memo: dict) -> None:
        return None  # a copy of the model (the folded one) compiles itself, not its original

    def __reduce__(self) -> tuple:
        return (type(None), ())  # a pickled model does not carry compiled code


_COMPILED_ATTRIBUTE = "_graft_compiled_forward"


def _compiled(model: nn.Module) -> _Compiled | None:
    """`model`'s compiled forward, made on the first call; None once compiling it has failed."""
    entry = compiled_forward(model)
    if entry is None:
        entry = _remember_compiled(model, _Compiled(torch.compile(model)))
    return entry if entry.module is not None else None


def compiled_forward(model: nn.Module) -> _Compiled | None:
    """What `forward_batches(..., compile=True)` left on `model`; None if it never compiled it."""
    return model.__dict__.get(_COMPILED_ATTRIBUTE)


def _remember_compiled(model: nn.Module, entry: _Compiled) -> _Compiled:
    object.__setattr__(model, _COMPILED_ATTRIBUTE, entry)  # not a submodule: outside state_dict and children
    return entry


def item_key(digest: str, augment: str, view: int, seed: int) -> str:
    if augment == "none":
        return digest
    return f"{digest}.{augment}.s{seed}.v{view}"

