"""Class activation maps: where in the image the prediction came from (Grad-CAM).

The maps come from the grad-cam library (`pytorch_grad_cam.GradCAM`) on the bundle's whole
model (backbone + head), at the output of the backbone's last stage: the last layer that still
has a spatial layout. `graft predict BUNDLE IMAGES --explain DIR` writes one overlay per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from graft.errors import ConfigError
from graft.extras import require_extra
from graft.input.images import load_image
from graft.models.stages import discover_stages
from graft.report.activations import displayable
from graft.shipping.bundle import Bundle


@dataclass(frozen=True)
class Explanation:
    """One image's class activation map, written as an overlay PNG."""

    path: str
    label: str  # the class the map explains (the prediction unless another was asked for)
    score: float
    out: Path


def target_layer(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """The backbone's last stage's last module (name, module): the Grad-CAM layer."""

    backbone = model.backbone
    modules = dict(backbone.named_modules())
    for stage in reversed(discover_stages(backbone)):
        if stage.module_names and stage.module_names[-1] in modules:
            return stage.module_names[-1], modules[stage.module_names[-1]]
    raise ConfigError("--explain: the backbone has no stage module to take class activation maps from")


def token_reshape(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """For transformer backbones (tokens out, not maps): tokens → (N, C, h, w), prefix tokens dropped."""
    prefix = int(getattr(model.backbone, "num_prefix_tokens", 0) or 0)

    def reshape(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() != 3:
            return tensor
        tokens = tensor[:, prefix:, :]
        side = int(round(tokens.shape[1] ** 0.5))
        return tokens.reshape(tokens.shape[0], side, side, tokens.shape[2]).permute(0, 3, 1, 2)

    return reshape


def explain_images(
    bundle: Bundle,
    paths: Iterable[str | Path],
    out_dir: str | Path,
    *,
    labels: Sequence[str] | None = None,
) -> list[Explanation]:
    """Write a Grad-CAM overlay `OUT_DIR/<image name>.cam.png` for each image file.

    The map explains the predicted class, or `labels[i]` for image i when given. Returns what was
    written. Unreadable images raise `ImageError` naming the file.

    >>> explain_images(load_bundle("runs/birds/bundle"), ["robin.jpg"], "cams/")[0].out
    PosixPath('cams/robin.cam.png')
    """

    require_extra("report", "pytorch_grad_cam")
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget


    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--explain: {out_dir} is a file; give a folder to write the class activation maps into")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in paths]
    if labels is not None:
        if len(labels) != len(paths):
            raise ConfigError(f"explain_images: {len(labels)} labels for {len(paths)} images; give one label per image")
        unknown = sorted(set(labels) - set(bundle.class_names))
        if unknown:
            raise ConfigError(f"explain_images: labels {unknown} are not among the bundle's classes ({', '.join(bundle.class_names)})")
    model = bundle.model
    _, layer = target_layer(model)
    results: list[Explanation] = []
    used: set[str] = set()
    with GradCAM(model=model, target_layers=[layer], reshape_transform=token_reshape(model)) as cam, torch.enable_grad():
        for number, path in enumerate(paths):
            image = load_image(path)
            batch = bundle.transform(image).unsqueeze(0).to(bundle.device)
            # The score shown is the one predict gives (the bundle's own precision); the map
            # itself is computed in fp32, where gradients are exact.
            probabilities = bundle.probabilities([image])[0]
            index = bundle.class_names.index(labels[number]) if labels is not None else int(probabilities.argmax())
            mask = cam(input_tensor=batch, targets=[ClassifierOutputTarget(index)])[0]
            overlay = show_cam_on_image(displayable(batch, bundle.preprocessing).astype(np.float32), mask, use_rgb=True)
            label, score = bundle.class_names[index], float(probabilities[index])
            target = out_dir / _unique_name(path, used)
            _captioned(Image.fromarray(overlay), f"{label} {score:.2f}").save(target)
            results.append(Explanation(path=str(path), label=label, score=score, out=target))
    return results


def _unique_name(path: Path, used: set[str]) -> str:
    # Two images called "1.jpg" in different folders must not overwrite each other's map.
    name, n = f"{path.stem}.cam.png", 1
    while name in used:
        n += 1
        name = f"{path.stem}-{n}.cam.png"
    used.add(name)
    return name


def _captioned(image: Image.Image, caption: str) -> Image.Image:
    """The overlay with a caption strip on top (the explained class and its probability)."""
    strip = 18
    canvas = Image.new("RGB", (image.width, image.height + strip), (255, 255, 255))
    canvas.paste(image, (0, strip))
    ImageDraw.Draw(canvas).text((4, 3), caption, fill=(0, 0, 0))
    return canvas
