"""The bundle: what predict, evaluate, serve and export need, and nothing else.

    bundle/
      model.safetensors   the whole adapted network (backbone + head), tensors only
      graft.json          format version, backbone, class names, preprocessing, head, strategy,
                          the calibration temperature
      unknown.safetensors what scores how unlike the training images an input is (graft.shipping.unknown)

Loading never unpickles anything: safetensors + JSON. A bundle is written into a temporary
folder and renamed into place, so it appears whole or not at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image

from graft import __version__
from graft.errors import BundleError, ConfigError, ImageError, TrainingError
from graft.input.images import load_image, to_rgb
from graft.input.preprocessing import Preprocessing, build_transforms
from graft.models.backbones import create_architecture
from graft.models.heads import HeadSpec, make_head
from graft.models.lora import apply_lora
from graft.models.model import GraftModel
from graft.models.pooling import pooled_model
from graft.ranges import BATCH_SIZE, TOP_K, check_number
from graft.run_folder import replace_dir
from graft.shipping.bundle_schema import (
    BUNDLE_FORMAT, BundleDocument, DAMAGED, check_adapters, check_head, check_runs, check_weights, read_document,
    safetensors_shapes,
)
from graft.choices import UNKNOWN_MODES
from graft.shipping.multilabel import LabelSetPrediction, check_threshold, label_sets
from graft.shipping.unknown import UNKNOWN_LABEL, UnknownDetector, load_unknown, save_unknown
from graft.speed.allocator import reuse_freed_memory
from graft.speed.folding import inference_network
from graft.speed.numerics import autocast, inference_precision

MODEL_FILE = "model.safetensors"
META_FILE = "graft.json"


@dataclass(frozen=True)
class Prediction:
    """One image's prediction: the best label and score, and the top-k (label, score) pairs.

    With the bundle's "none of these" check on, `unknown_score` says how unlike the training
    images the image is, and `label` is "unknown" past the bundle's threshold (`score` and
    `top_k` stay the classifier's)."""

    path: str
    label: str
    score: float
    top_k: list[tuple[str, float]]
    unknown_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        row = {
            "path": self.path,
            "label": self.label,
            "score": round(self.score, 6),
            "top_k": [{"label": label, "score": round(score, 6)} for label, score in self.top_k],
        }
        if self.unknown_score is not None:
            row["unknown_score"] = round(self.unknown_score, 6)
        return row


def save_bundle(path: str | Path, model: GraftModel, meta: dict[str, Any], *, unknown: UnknownDetector | None = None) -> Path:
    """Write `model` and its metadata (and the "none of these" detector) as a bundle folder at `path`, atomically."""
    from safetensors.torch import save_file


    path = Path(path)
    full_meta = {"format_version": BUNDLE_FORMAT, "graft_version": __version__, **meta}
    full_meta.pop("unknown", None)  # recorded only with its tensors, which come with `unknown`
    if unknown is not None:
        full_meta["unknown"] = unknown.record()
    for key in ("backbone", "class_names", "preprocessing", "head"):
        if key not in full_meta:
            raise BundleError(f"bundle metadata is missing {key!r} (a graft bug: please report it)")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    diverged = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if diverged:
        raise TrainingError(f"{path}: not written, {len(diverged)} tensors hold nan or inf ({diverged[0]} first): the training diverged; "
                            "rerun with a lower --lr")
    with replace_dir(path) as folder:
        save_file(state, str(folder / MODEL_FILE), metadata={"format": "graft", "format_version": str(BUNDLE_FORMAT)})
        if unknown is not None:
            save_unknown(folder, unknown)
        (folder / META_FILE).write_text(json.dumps(full_meta, indent=2) + "\n", encoding="utf-8")
    return path


class Bundle:
    """A trained classifier loaded from a bundle folder.

    >>> bundle = load_bundle("runs/birds/bundle")
    >>> [p.label for p in bundle.predict(["robin.jpg", "wren.jpg"])]

    `temperature` divides the logits before the softmax (fitted on validation after training,
    `graft.training.calibration`; 1 for bundles without one): the scores of `predict` and
    `probabilities` are calibrated, `logits` are the network's own.

    `precision` is what `logits` computes in: the bundle's recorded training precision
    (`meta["precision"]`) where this device runs it natively, else fp32; assign "fp32" to force it.
    `unknown` scores how unlike the training images an input is (None for a bundle without it);
    `predict(..., unknown="off")` never answers "unknown".
    """

    def __init__(self, path: Path, meta: dict[str, Any], model: GraftModel) -> None:
        self.path = path
        self.meta = meta
        self.model = model.eval()
        self.class_names: list[str] = list(meta["class_names"])
        self.preprocessing = Preprocessing.from_dict(meta["preprocessing"])
        self.transform = build_transforms(self.preprocessing)
        self.device = torch.device("cpu")
        self.precision = inference_precision(meta.get("precision"), self.device)
        self.temperature = float(meta.get("temperature", 1.0))
        self.task: str = meta.get("task", "classification")  # "multilabel": label sets (`graft.shipping.multilabel`)
        self.thresholds: list[float] | None = meta.get("thresholds")
        self.unknown: UnknownDetector | None = None

    @property
    def backbone(self) -> str:
        return str(self.meta["backbone"]["architecture"])

    def to(self, device: str | torch.device) -> "Bundle":
        self.device = torch.device(device)
        self.model.to(self.device)
        self.precision = inference_precision(self.meta.get("precision"), self.device)
        return self

    def logits(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Raw logits (N, classes) for RGB PIL images, preprocessed as in training."""
        return self.features_and_logits(images)[1]

    def features_and_logits(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """The features the head reads (N, D) and its raw logits (N, classes), for RGB PIL images."""
        if not images:
            return torch.empty(0, int(self.meta["head"]["in_features"])), torch.empty(0, len(self.class_names))
        model = inference_network(self.model, self.preprocessing.input_size, self.precision)  # BatchNorm folded in fp32
        with torch.inference_mode():
            batch = torch.stack([self.transform(image) for image in images]).to(self.device)
            # The precision the bundle was trained in, where the device runs it (see `precision`).
            with autocast(self.precision, self.device):
                features = model.backbone(batch.contiguous(memory_format=torch.channels_last))
                logits = model.head(features)
            return features.float().cpu(), logits.float().cpu()

    def probabilities(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Calibrated class probabilities (N, classes): softmax of the logits divided by `temperature`."""
        return (self.logits(images) / self.temperature).softmax(dim=1)

    def predict(self, sources: Iterable[str | Path | Image.Image], *, top_k: int = 5, batch_size: int = 32,
                threshold: float | None = None, unknown: str = "auto") -> list[Prediction] | list[LabelSetPrediction]:
        """Predict image files (paths) or PIL images. Unreadable files raise `ImageError`.

        A multi-label bundle gives `LabelSetPrediction`s: the labels at or above their stored
        thresholds, or above `threshold` for every label when given. `unknown="auto"` answers
        "unknown" for an image past the bundle's "none of these" threshold (`graft.shipping.unknown`),
        "off" always answers with one of the classes."""
        return list(self.iter_predict(sources, top_k=top_k, batch_size=batch_size, threshold=threshold, unknown=unknown))

    def iter_predict(
        self,
        sources: Iterable[str | Path | Image.Image],
        *,
        top_k: int = 5,
        batch_size: int = 32,
        on_error: Callable[[ImageError], None] | None = None,
        threshold: float | None = None,
        unknown: str = "auto",
    ) -> Iterator[Prediction]:
        """Like `predict`, streaming: images are read and predicted one batch at a time.

        An unreadable file raises `ImageError`, or, with `on_error`, is handed to it and skipped.
        `top_k` and `batch_size` out of range raise `ConfigError` here, before any image is read.
        """

        check_number("top_k", top_k, TOP_K)
        check_number("batch_size", batch_size, BATCH_SIZE)
        check_threshold(threshold)
        if unknown not in UNKNOWN_MODES:
            raise ConfigError(f"{unknown!r} is not one of {', '.join(UNKNOWN_MODES)} (auto: answer 'unknown' for images "
                              "unlike the training images, off: never)", parameter="unknown")
        detector = self.unknown if unknown == "auto" else None
        return self._stream_predictions(sources, top_k, batch_size, on_error, threshold, detector)

    def _stream_predictions(self, sources: Iterable[str | Path | Image.Image], top_k: int, batch_size: int,
                            on_error: Callable[[ImageError], None] | None, threshold: float | None,
                            detector: UnknownDetector | None) -> Iterator[Prediction]:

        min_size = self.preprocessing.resize_size  # files are decoded no larger than the resize needs
        names: list[str] = []
        images: list[Image.Image] = []
        for source in sources:
            if isinstance(source, Image.Image):
                names.append(getattr(source, "filename", "") or f"<image {len(names)}>")
                images.append(to_rgb(source))
            else:
                try:
                    image = load_image(source, min_size=min_size)
                except ImageError as error:
                    if on_error is None:
                        raise
                    on_error(error)
                    continue
                names.append(str(source))
                images.append(image)
            if len(images) == batch_size:
                yield from self._predict_batch(names, images, top_k, threshold, detector)
                names, images = [], []
        if images:
            yield from self._predict_batch(names, images, top_k, threshold, detector)

    def _predict_batch(self, names: list[str], images: list[Image.Image], top_k: int, threshold: float | None,
                       detector: UnknownDetector | None) -> Iterator[Prediction]:
        if self.task == "multilabel":
            yield from label_sets(names, self.logits(images), self.class_names, self.thresholds or [], top_k, threshold)
            return
        features, logits = self.features_and_logits(images)
        probabilities = (logits / self.temperature).softmax(dim=1)
        k = max(1, min(top_k, len(self.class_names)))
        scores, indices = probabilities.topk(k, dim=1)
        unknown_scores = detector.scores(features).tolist() if detector is not None else [None] * len(names)
        for name, row_scores, row_indices, unknown_score in zip(names, scores.tolist(), indices.tolist(), unknown_scores):
            pairs = [(self.class_names[i], float(s)) for s, i in zip(row_scores, row_indices)]
            label = UNKNOWN_LABEL if unknown_score is not None and unknown_score > detector.threshold else pairs[0][0]
            yield Prediction(path=name, label=label, score=pairs[0][1], top_k=pairs, unknown_score=unknown_score)


def load_bundle(path: str | Path) -> Bundle:
    """Load a bundle folder (or a run folder that holds one) without unpickling anything.

    graft.json is checked against its schema and against the tensors of model.safetensors, and
    one blank image is run through the model, before the bundle is returned
    (`graft.shipping.bundle_schema`): a damaged or mismatched bundle raises one `BundleError` naming the
    field at fault, here rather than at its first prediction.
    """
    from safetensors.torch import load_file


    reuse_freed_memory()  # see graft.speed.allocator
    path = Path(path)
    if (path / "bundle" / META_FILE).is_file() and not (path / META_FILE).is_file():
        path = path / "bundle"
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle folder; give the bundle/ folder of a graft run")
    meta_path, model_path = path / META_FILE, path / MODEL_FILE
    for required in (meta_path, model_path):
        if not required.is_file():
            raise BundleError(f"{path}: the bundle is incomplete ({required.name} is missing); re-export or re-train it")
    meta, document = read_document(meta_path)
    shapes = safetensors_shapes(model_path)
    check_head(meta_path, document, shapes)
    check_adapters(meta_path, document, shapes)
    model = _build_model(meta_path, document)
    check_weights(meta_path, document, model.state_dict(), shapes)
    try:
        model.load_state_dict(load_file(str(model_path)), strict=True)
    except Exception as exc:  # the header was read: the tensors' bytes are what is damaged
        raise BundleError(f"{model_path}: cannot be read as safetensors ({str(exc)[:200]}); {DAMAGED}") from None
    model.eval().to(memory_format=torch.channels_last)
    bundle = Bundle(path, meta, model)
    if document.unknown is not None:
        bundle.unknown = load_unknown(path, document.unknown, len(document.class_names), document.head.in_features)
    check_runs(meta_path, bundle)
    return bundle


def _build_model(meta_path: Path, document: BundleDocument) -> GraftModel:
    """The untrained network graft.json describes, ready for model.safetensors."""
    import timm


    backbone = document.backbone
    try:
        architecture = create_architecture(backbone.architecture)
    except Exception as exc:
        hint = "" if isinstance(exc, ConfigError) else f" ({type(exc).__name__}: {str(exc)[:200]})"
        raise BundleError(
            f"{meta_path}: backbone.architecture {backbone.architecture!r} is not a model of the installed timm "
            f"{timm.__version__}{hint}; upgrade timm if the bundle comes from a newer one, else {DAMAGED}"
        ) from None
    try:
        network = pooled_model(architecture, backbone.pooling, name=backbone.architecture)
    except ConfigError as exc:
        raise BundleError(f"{meta_path}: backbone.pooling {backbone.pooling!r} cannot be built ({exc}); {DAMAGED}") from None
    model = GraftModel(network, make_head(HeadSpec(**document.head.model_dump())))
    adapters = document.adapters
    if adapters is not None:

        try:
            apply_lora(model, rank=adapters.rank, alpha=adapters.alpha, target_modules=list(adapters.target_modules))
        except ConfigError:
            raise BundleError(f'{meta_path}: adapters: this bundle has LoRA adapters, which need peft: pip install "graft[lora]"') from None
        except ValueError as exc:  # peft: a target that names no layer of the architecture
            raise BundleError(f"{meta_path}: adapters.target_modules: {str(exc)[:200]}; {DAMAGED}") from None
    return model
