"""Fitting a run's "none of these" detector (`graft.shipping.unknown`) in its model's own feature space.

The detector must score an input where the trained head reads it: the frozen backbone's features
for feature-extract (already in the feature cache, so this costs nothing), the fine-tuned
backbone's for every other strategy (one pass over the training and validation images after
training). Whether the backbone changed is read from its weights, not from the strategy's name:
`auto` may choose either, and a LoRA run changes the backbone through its adapters.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from graft.console import Reporter
from graft.input.data import Dataset
from graft.models.backbones import Backbone
from graft.shipping.unknown import UnknownDetector, fit_unknown_detector
from graft.training.features import FeatureCache, backbone_key, extract_features


def weights_fingerprint(module: nn.Module) -> str:
    """A digest of every tensor of `module`'s state: equal before and after training only if nothing moved."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fit_run_detector(model_backbone: nn.Module, view: Backbone, dataset: Dataset, *, frozen: bool, cache_root: Path | None,
                     precision: str, device: torch.device, reporter: Reporter) -> UnknownDetector:
    """The detector of a trained model whose backbone is `model_backbone`, seen through `view`
    (the pretrained backbone with the run's preprocessing, pooling and width). `frozen`: the
    backbone's weights are the pretrained ones, so the cached features are its features."""
    backbone = replace(view, model=model_backbone)
    cache = FeatureCache(cache_root, backbone_key(backbone, backbone.preprocessing, precision)) if frozen and cache_root else None
    features = {}
    for name, images in (("training", dataset.train), ("validation", dataset.val)):
        with reporter.progress(f"unknown-image check: features ({name})", len(images.paths)) as advance:
            features[name] = extract_features(backbone, images.paths, images.digests, cache=cache, precision=precision,
                                              device=device, progress=advance)
    detector = fit_unknown_detector(features["training"], torch.tensor(dataset.train.labels), features["validation"])
    reporter.say(f"unknown-image check: {detector.method} (k {detector.k}) on {len(dataset.train)} training features, threshold "
                 f"{detector.threshold:.4g} keeps {1 - detector.val_rejected:.1%} of the validation images")
    return detector
