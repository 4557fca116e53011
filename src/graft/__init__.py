"""graft: transfer learning on images, the right way, offline.

    >>> import graft
    >>> run = graft.train("photos/", out="runs/birds")            # adapt, evaluate, save
    >>> bundle = graft.load_bundle(run.bundle_dir)
    >>> bundle.predict(["robin.jpg"])[0].label
    >>> graft.evaluate(bundle, "holdout/")["accuracy"]
    >>> graft.inspect("efficientnet_lite0").stages
    >>> graft.check("photos/", out="runs/photos-check").findings   # wrong labels, leaks, odd images

The names below are imported on first use, so `import graft` does not pay for torch and timm
until they are needed (the CLI's `--help` stays instant).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Inspection": "graft.api",
    "RunResult": "graft.api",
    "check": "graft.api",
    "DataCheck": "graft.input.check",
    "evaluate": "graft.api",
    "inspect": "graft.api",
    "predict": "graft.api",
    "train": "graft.api",
    "train_with_config": "graft.api",
    "Backbone": "graft.models.backbones",
    "load_backbone": "graft.models.backbones",
    "Bundle": "graft.shipping.bundle",
    "Prediction": "graft.shipping.bundle",
    "load_bundle": "graft.shipping.bundle",
    "TrainConfig": "graft.config",
    "BackboneError": "graft.errors",
    "BundleError": "graft.errors",
    "ConfigError": "graft.errors",
    "DataError": "graft.errors",
    "GraftError": "graft.errors",
    "ImageError": "graft.errors",
    "OutputError": "graft.errors",
    "TrainingError": "graft.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'graft' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
