"""Feature maps: what a chosen image looks like to each stage of a trained backbone.

`graft show-features BUNDLE IMAGE --stages 1,4,7 --out maps.png` and the report's "Feature maps"
section both come from `feature_maps_figure`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from graft.atomic import atomic_path
from graft.errors import ConfigError
from graft.input.images import load_image
from graft.input.preprocessing import Preprocessing
from graft.models.stages import Stage, discover_stages
from graft.report.forgetting import stage_features
from graft.shipping.bundle import Bundle

DEFAULT_CHANNELS = 6


def select_stages(stages: Sequence[Stage], spec: str | Sequence[str | int] | None) -> list[Stage]:
    """Stages chosen by index or name: "all", "0,3,7", "blocks.2", or a list of those.

    >>> [s.index for s in select_stages(stages, "1,-1")]  # negative indices count from the end
    """
    if spec is None or spec == "all" or spec == "":
        return list(stages)
    items = [part.strip() for part in spec.split(",")] if isinstance(spec, str) else [str(part).strip() for part in spec]
    by_name = {stage.name: stage for stage in stages}
    chosen: list[Stage] = []
    for item in items:
        stage = by_name.get(item)
        if stage is None:
            try:
                stage = stages[int(item)]
            except (ValueError, IndexError):
                names = ", ".join(f"{s.index}={s.name}" for s in stages)
                raise ConfigError(
                    f"--stages: {item!r} is neither a stage index (0 to {len(stages) - 1}, or negative "
                    f"from the end) nor a stage name; this backbone's stages are {names} "
                    "(`graft inspect BACKBONE` lists them)"
                ) from None
        if stage not in chosen:
            chosen.append(stage)
    return chosen


def displayable(batch: torch.Tensor, preprocessing: Preprocessing) -> np.ndarray:
    """The first preprocessed image of `batch` back in [0, 1] RGB (H, W, 3), as the model saw it."""
    mean = torch.tensor(preprocessing.mean).view(3, 1, 1)
    std = torch.tensor(preprocessing.std).view(3, 1, 1)
    return (batch[0].float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def feature_maps_figure(
    bundle: Bundle,
    image: Image.Image,
    *,
    stages: str | Sequence[str | int] | None = None,
    channels: int = DEFAULT_CHANNELS,
):
    """A figure with the image and, per chosen stage, its most active channels on that image."""
    if channels < 1:
        raise ConfigError(f"--channels: expected 1 or more, got {channels}")
    from graft.report.figures import feature_maps  # matplotlib loads only when a figure is drawn

    backbone = bundle.model.backbone
    chosen = select_stages(discover_stages(backbone), stages)
    batch = bundle.transform(image).unsqueeze(0)
    outputs = stage_features(backbone, chosen, batch)
    maps = {}
    for stage in chosen:
        activation = outputs.get(stage.index)
        if activation is None or activation.dim() != 4:
            continue  # token-shaped outputs (ViT blocks) have no spatial map to draw
        size = "x".join(str(n) for n in activation.shape[1:])
        maps[f"stage {stage.index}: {stage.name[:22]} ({size})"] = activation[0].numpy()
    if not maps:
        raise ConfigError(
            "--stages: none of the chosen stages has a spatial (channels x height x width) output to draw; "
            "choose convolutional stages"
        )
    return feature_maps(displayable(batch, bundle.preprocessing), maps, channels)


def write_feature_maps(
    bundle: Bundle,
    image_path: str | Path,
    out: str | Path,
    *,
    stages: str | Sequence[str | int] | None = None,
    channels: int = DEFAULT_CHANNELS,
) -> Path:
    """Write the feature-maps figure of one image file as a PNG at `out`; returns `out`.

    >>> write_feature_maps(load_bundle("runs/birds/bundle"), "robin.jpg", "maps.png", stages="1,4,-1")
    """

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out: {out} should be a .png file (the figure is written as PNG); e.g. --out maps.png")
    fig = feature_maps_figure(bundle, load_image(image_path), stages=stages, channels=channels)
    with atomic_path(out) as temporary:
        fig.savefig(temporary, format="png", dpi=100)
    return out
