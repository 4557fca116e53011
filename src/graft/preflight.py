"""Checks of a run's options that need the backbone's metadata, done before any work.

`TrainConfig` checks each option on its own; what needs to know the backbone (is the name a
model? how many stages has it?) is checked here, before the images are read or weights loaded,
so that a typo costs a second instead of a whole image check.
"""

from __future__ import annotations

from pathlib import Path

from graft.config import TrainConfig
from graft.errors import BackboneError
from graft.models.backbones import BUNDLED, check_backbone_name
from graft.models.stages import discover_stages
from graft.strategies import get_strategy


def check_options(config: TrainConfig) -> None:
    """Raise `ConfigError`/`BackboneError` for options that cannot work with the chosen backbone.

    Unknown backbone names are listed with close matches and the offline choices; a `--weights`
    file must exist; `--train-stages` must fit the backbone's stage count (1 to N, N named).
    """

    check_backbone_name(config.backbone)
    if config.weights is not None and not Path(config.weights).is_file():
        raise BackboneError(f"--weights: {config.weights} does not exist; give the path of a state-dict file")
    if config.strategy in ("partial", "lp-ft") and config.train_stages is not None and config.train_stages > 1:
        import timm
        import torch


        spec = BUNDLED.get(config.backbone)
        architecture = spec.architecture if spec else config.backbone
        # On the meta device: the stage list without allocating (or loading) a single weight.
        with torch.device("meta"):
            model = timm.create_model(architecture, pretrained=False, num_classes=0)
        get_strategy(config.strategy).plan(discover_stages(model), config)  # type: ignore[attr-defined]
