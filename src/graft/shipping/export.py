"""ONNX export of a bundle, checked against PyTorch on real images before the file is written.

The ONNX graph takes the *preprocessed* tensor (N, 3, H, W). For a single-label bundle it returns
`logits` (N, classes) already divided by the bundle's calibration temperature, so their softmax is
the bundle's calibrated probabilities, the scores `graft predict` gives (`graft.training.calibration`).
For a multi-label bundle it returns `scores` (N, labels), the sigmoid of the logits in the graph, to
compare with the per-label thresholds of the metadata (`graft.thresholds`): a label is in an
image's set when its score reaches its threshold, as in `graft predict`. The
preprocessing that produces that tensor (resize, center crop, mean/std) is documented in the
file's metadata (`metadata_props`), together with the class names, so a consumer in any language
has everything it needs. The batch dimension is dynamic.

The export is checked with onnxruntime against the PyTorch model on real photos (the given
images, or scikit-image's bundled photos): the largest absolute difference of the logits (of the
scores, for a multi-label bundle) must be below `tolerance`, otherwise nothing is written. The file is written atomically.

>>> from graft import load_bundle
>>> result = export_onnx(load_bundle("runs/birds/bundle"))
>>> result.path, result.max_abs_diff
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from graft import __version__
from graft.atomic import atomic_path
from graft.errors import ConfigError, GraftError
from graft.extras import require_extra
from graft.input.images import load_image, to_rgb
from graft.run_folder import read_manifest
from graft.shipping.bundle import Bundle, load_bundle
from graft.training.calibration import TemperatureScaled

DEFAULT_OPSET = 17
# fp32 logits from two runtimes on the same tensor; measured differences are around 1e-6.
DEFAULT_TOLERANCE = 1e-4
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
# A multi-label graph's output: sigmoid scores, compared with graft.thresholds as they are.
SCORES_NAME = "scores"
# scikit-image's bundled photos used when no check images are given (real photos, not noise).
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea")


class ExportError(GraftError):
    """The exported model does not reproduce the PyTorch model (or cannot be produced)."""


@dataclass(frozen=True)
class ExportResult:
    """What `export_onnx` wrote and how closely onnxruntime matched PyTorch."""

    path: Path
    opset: int
    max_abs_diff: float
    tolerance: float
    num_check_images: int
    check_source: str
    metadata: dict[str, str]
    compared: str = OUTPUT_NAME  # what max_abs_diff measures: "logits", or a multi-label graph's "scores"

    @property
    def passed(self) -> bool:
        return self.max_abs_diff < self.tolerance


def export_onnx(
    bundle: Bundle | str | Path,
    out: str | Path | None = None,
    opset: int = DEFAULT_OPSET,
    check_images: Sequence[str | Path | Image.Image] | None = None,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportResult:
    """Export `bundle` to ONNX at `out` (default: `model.onnx` beside the bundle folder).

    `check_images` (paths or PIL images) are preprocessed like predict does and run through both
    PyTorch and onnxruntime; without them scikit-image's bundled photos are used (the `[data]`
    extra). Raises `ExportError`, and writes nothing, if the logits (a multi-label bundle's sigmoid
    scores) differ by `tolerance` or more.
    """

    onnx, onnxruntime = require_extra("export", "onnx", "onnxruntime")

    model_bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    if not 7 <= opset <= 23:
        raise ConfigError(f"--opset: expected an ONNX opset between 7 and 23 (17 is a safe choice), got {opset}")
    # Default beside the bundle, not inside it: a bundle holds what predict needs and nothing else.
    target = Path(out) if out is not None else model_bundle.path.parent / "model.onnx"
    if target.is_dir():
        raise ConfigError(f"--out: {target} is a folder; give a file name such as {target / 'model.onnx'}")
    images, check_source = _check_images(check_images)
    batch = torch.stack([model_bundle.transform(image) for image in images]).float()

    proto = _to_onnx(onnx, model_bundle, opset)
    metadata = onnx_metadata(model_bundle)
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    max_diff = _max_output_difference(model_bundle, session, batch)
    metadata["graft.check_max_abs_diff"] = f"{max_diff:.3e}"
    metadata["graft.check_images"] = f"{len(images)} ({check_source})"
    if not max_diff < tolerance:
        raise ExportError(
            f"{target}: onnxruntime's {_output_name(model_bundle)} differ from PyTorch's by {max_diff:.3e} on "
            f"{len(images)} images ({check_source}), over the tolerance {tolerance:g}; nothing was "
            f"written. Try another --opset (now {opset}) or report the backbone {model_bundle.backbone!r}"
        )
    _describe(onnx, proto, model_bundle, metadata)
    _write(target, proto)
    return ExportResult(
        path=target,
        opset=opset,
        max_abs_diff=max_diff,
        tolerance=tolerance,
        num_check_images=len(images),
        check_source=check_source,
        metadata=metadata,
        compared=_output_name(model_bundle),
    )


def _describe(onnx: Any, proto: Any, bundle: Bundle, metadata: dict[str, str]) -> None:
    """Put `metadata` and a one-paragraph description into the model, then let onnx check it."""
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    if bundle.task == "multilabel":
        kind, output = (f"multi-label classifier ({bundle.backbone}, {len(bundle.class_names)} labels)",
                        f"output {SCORES_NAME!r}: sigmoid scores (N, labels) in graft.class_names order; an image has "
                        "each label whose score is at or above its threshold in graft.thresholds.")
    else:
        kind, output = (f"classifier ({bundle.backbone}, {len(bundle.class_names)} classes)",
                        f"output {OUTPUT_NAME!r}: logits (N, classes) in graft.class_names order, divided by "
                        "graft.temperature (softmax: calibrated probabilities).")
    proto.doc_string = (
        f"graft {kind}. Input {INPUT_NAME!r}: float32 (N, 3, H, W) after resize/crop/normalise as in "
        f"graft.preprocessing; {output}"
    )
    onnx.checker.check_model(proto)


def _write(target: Path, proto: Any) -> None:
    """Write the model whole (`atomic_path`); beside a run's bundle it becomes the run's file."""
    run_folder = read_manifest(target.parent)
    if run_folder is not None:  # model.onnx beside a run's bundle is the run's: --overwrite removes it too
        run_folder.record([target.name])
    with atomic_path(target) as temporary:
        temporary.write_bytes(proto.SerializeToString())


def onnx_metadata(bundle: Bundle) -> dict[str, str]:
    """The ONNX `metadata_props` for a bundle: the task, class names and the preprocessing (and a
    multi-label bundle's thresholds), as strings."""

    pre = bundle.preprocessing
    metadata = {
        "graft.format": "graft-onnx-1",
        "graft.version": __version__,
        "graft.backbone": bundle.backbone,
        "graft.task": bundle.task,
        "graft.class_names": json.dumps(bundle.class_names),
        "graft.preprocessing": json.dumps(pre.to_dict()),
        "graft.input_size": json.dumps(list(pre.input_size)),
        "graft.interpolation": pre.interpolation,
        "graft.mean": json.dumps(list(pre.mean)),
        "graft.std": json.dumps(list(pre.std)),
        "graft.crop_pct": repr(pre.crop_pct),
        "graft.crop_mode": pre.crop_mode,
        "graft.input": (
            f"{INPUT_NAME}: float32 (batch, {', '.join(map(str, pre.input_size))}); RGB resized "
            f"({pre.interpolation}) so the center crop of {pre.crop_pct:g} is {pre.image_size} px, "
            f"scaled to [0, 1], then (x - mean) / std"
        ),
    }
    if bundle.task == "multilabel":  # sigmoid scores, not temperature-scaled: no graft.temperature
        metadata["graft.thresholds"] = json.dumps([float(t) for t in bundle.thresholds or []])
        metadata["graft.output"] = (
            f"{SCORES_NAME}: float32 (batch, {len(bundle.class_names)}), sigmoid(logits) computed in the graph; "
            "an image has every label whose score is >= its threshold in graft.thresholds (same order as graft.class_names)"
        )
    else:
        metadata["graft.output"] = (
            f"{OUTPUT_NAME}: float32 (batch, {len(bundle.class_names)}), the network's logits divided by "
            f"graft.temperature in the graph; softmax gives calibrated probabilities"
        )
        metadata["graft.temperature"] = repr(bundle.temperature)
    if bundle.unknown is not None:  # the "none of these" score reads the backbone's features, which the graph does not output
        metadata["graft.unknown"] = (
            f"not in the graph: graft predict / serve answer 'unknown' when the {bundle.unknown.method} score of the "
            f"backbone's features exceeds {bundle.unknown.threshold:.6g} (bundle/unknown.safetensors, graft.shipping.unknown)"
        )
    return metadata


def _to_onnx(onnx: Any, bundle: Bundle, opset: int) -> Any:
    # The TorchScript exporter: the torch.export-based one needs onnxscript, not a dependency here.
    channels, height, width = bundle.preprocessing.input_size
    # A batch of 2 to trace with, so nothing specialises on a batch of 1; it is declared dynamic.
    example = torch.zeros(2, channels, height, width)
    buffer = io.BytesIO()
    was_training = bundle.model.training
    bundle.model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notices
            torch.onnx.export(
                _graph(bundle),
                (example,),
                buffer,
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[_output_name(bundle)],
                dynamic_axes={INPUT_NAME: {0: "batch"}, _output_name(bundle): {0: "batch"}},
                do_constant_folding=True,
            )
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed for {bundle.backbone!r} at opset {opset}: {exc}") from exc
    finally:
        bundle.model.train(was_training)
        bundle.model.to(bundle.device)
    return onnx.load_from_string(buffer.getvalue())


def _output_name(bundle: Bundle) -> str:
    return SCORES_NAME if bundle.task == "multilabel" else OUTPUT_NAME


def _graph(bundle: Bundle) -> torch.nn.Module:
    """What the graph computes, on the CPU: sigmoid scores (multi-label) or logits / temperature."""
    if bundle.task == "multilabel":
        return torch.nn.Sequential(bundle.model.cpu(), torch.nn.Sigmoid())
    return TemperatureScaled(bundle.model.cpu(), bundle.temperature)


def _max_output_difference(bundle: Bundle, session: Any, batch: torch.Tensor) -> float:
    """Largest |PyTorch - onnxruntime| over the whole batch and over each image alone: on the
    network's logits (the graph's output times the temperature), whatever the temperature; on the
    sigmoid scores the graph outputs for a multi-label bundle."""
    name = _output_name(bundle)
    with torch.inference_mode():
        # The same memory format as `Bundle.logits`, in fp32 like the ONNX graph (predict may run in
        # bf16 where the bundle was trained so; that path is within graft.speed.numerics.BF16_TOLERANCE).
        expected = _graph(bundle)(batch.contiguous(memory_format=torch.channels_last)).float().numpy()
    bundle.model.to(bundle.device)
    got = session.run([name], {INPUT_NAME: batch.numpy()})[0]
    if got.shape != expected.shape:
        raise ExportError(f"onnxruntime returned {name} of shape {got.shape}, PyTorch {expected.shape}")
    # One image at a time as well: the batch size then differs from the traced one (2).
    single = np.concatenate([session.run([name], {INPUT_NAME: batch[i : i + 1].numpy()})[0] for i in range(len(batch))])
    scale = 1.0 if bundle.task == "multilabel" else bundle.temperature
    return float(max(np.abs(got - expected).max(), np.abs(single - expected).max()) * scale)


def _check_images(images: Sequence[str | Path | Image.Image] | None) -> tuple[list[Image.Image], str]:

    if images is not None:
        loaded = [to_rgb(image) if isinstance(image, Image.Image) else load_image(image) for image in images]
        if not loaded:
            raise ConfigError("check_images: expected at least one image to compare PyTorch and ONNX on, got none")
        return loaded, "given images"
    try:
        import skimage.data
    except ImportError:
        raise ConfigError(
            "export checks the ONNX model on real photos: pass check_images (--check-images PATH), "
            'or install scikit-image for its bundled photos: pip install "graft[data]"'
        ) from None
    photos = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in SKIMAGE_PHOTOS]
    return photos, "scikit-image photos: " + ", ".join(SKIMAGE_PHOTOS)
