"""graft: transfer learning on images, the right way, offline.

    >>> import graft
    >>> run = graft.train("photos/", out="runs/birds")            # adapt, evaluate, save
    >>> bundle = graft.load_bundle(run.bundle_dir)
    >>> bundle.predict(["robin.jpg"])[0].label
    >>> graft.evaluate(bundle, "holdout/")["accuracy"]
    >>> graft.inspect("efficientnet_lite0").stages
"""

from __future__ import annotations

__version__ = "0.1.0"

from graft.api import Inspection, RunResult, evaluate, inspect, predict, train, train_with_config
from graft.backbones import Backbone, load_backbone
from graft.bundle import Bundle, Prediction, load_bundle
from graft.config import TrainConfig
from graft.errors import BackboneError, BundleError, ConfigError, DataError, GraftError, ImageError

__all__ = [
    "Backbone",
    "BackboneError",
    "Bundle",
    "BundleError",
    "ConfigError",
    "DataError",
    "GraftError",
    "ImageError",
    "Inspection",
    "Prediction",
    "RunResult",
    "TrainConfig",
    "__version__",
    "evaluate",
    "inspect",
    "load_backbone",
    "load_bundle",
    "predict",
    "train",
    "train_with_config",
]
