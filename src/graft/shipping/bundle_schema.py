"""What a bundle's graft.json may hold, checked against its model.safetensors before anything runs.

`load_bundle` trusts nothing in a bundle folder. Three checks, each refusing with one
`BundleError` that names the field at fault, what was expected and the fix:

1. `read_document`: graft.json is a JSON object of a bundle format this graft reads, and every
   field has the type and range graft writes (`BundleDocument`, validated in strict mode: no
   string taken for a number, no bool for an integer, no NaN).
2. `check_head`, `check_adapters`, `check_weights`: the sizes graft.json records (the class
   names, the head's kind and widths, the LoRA rank and targets, the architecture) are those of
   the tensors in model.safetensors. The head and adapter checks read shapes from the
   safetensors header, before any layer is built, so a tampered size allocates nothing.
3. `check_runs`: one blank image goes through the preprocessing and the model and must come out
   as one finite logit per class. What the weights cannot tell (the width the pooling gives, an
   input size the architecture cannot take) fails here, at load, not at the first prediction.

The schema is pydantic's (a maintained validator, already graft's serve dependency) rather than
hand-written dataclass checks: its errors carry the path of the field (`preprocessing.std[1]`),
which is what every message must name, and each rule is declared once, on its field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, FiniteFloat, StrictInt, StrictStr, ValidationError, ValidationInfo, field_validator, model_validator

from graft.choices import CROP_MODES, HEAD_KINDS, INTERPOLATIONS, POOLINGS
from graft.errors import BundleError
from graft.models.heads import HeadSpec, make_head
from graft.models.lora import is_adapter_parameter
from graft.speed.numerics import intra_op_threads
from graft.training.calibration import MAX_TEMPERATURE, MIN_TEMPERATURE

if TYPE_CHECKING:
    from graft.shipping.bundle import Bundle

BUNDLE_FORMAT = 1
# Sanity bounds, far outside what any pretrained config uses (timm's: sides 106 to 1 024 px, std 0.14 to 1),
# so that a tampered size is refused rather than allocated.
MIN_INPUT_SIDE, MAX_INPUT_SIDE = 16, 2048
MAX_RESIZE_SIDE = 8192  # input side / crop_pct: what evaluation resizes each image to before cropping
MIN_STD = 0.001  # a pixel spread far below any real normalisation's
MAX_WIDTH = 2**31 - 1  # a layer's width (features, classes, hidden units, LoRA rank)

DAMAGED = "the bundle is damaged: copy it again from its training run, or re-train it"


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("expected a name, not an empty or blank string")
    return text


Name = Annotated[StrictStr, AfterValidator(_not_blank)]
Width = Annotated[StrictInt, Field(ge=1, le=MAX_WIDTH)]
Share = Annotated[FiniteFloat, Field(ge=0.0, le=1.0)]


def _rgb(low: float) -> Any:
    return Annotated[list[Annotated[FiniteFloat, Field(ge=low, le=1.0)]], Field(min_length=3, max_length=3)]


class _Record(BaseModel):
    # Fields graft does not read are ignored: a later graft of the same format may add some.
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class BackboneRecord(_Record):
    name: Name
    architecture: Name
    weights_source: StrictStr = ""
    weights_id: StrictStr = ""
    pooling: Literal[POOLINGS] = "avg"  # type: ignore[valid-type]  # bundles from before graft.models.pooling averaged


class HeadRecord(_Record):
    kind: Literal[HEAD_KINDS]  # type: ignore[valid-type]
    in_features: Width
    num_classes: Annotated[StrictInt, Field(ge=2, le=MAX_WIDTH)]
    hidden: Width = 512
    dropout: Annotated[FiniteFloat, Field(ge=0.0, lt=1.0)] = 0.0


class PreprocessingRecord(_Record):
    input_size: Annotated[list[StrictInt], Field(min_length=3, max_length=3)]
    interpolation: Literal[INTERPOLATIONS]  # type: ignore[valid-type]
    mean: _rgb(0.0)  # type: ignore[valid-type]
    std: _rgb(MIN_STD)  # type: ignore[valid-type]
    crop_pct: Annotated[FiniteFloat, Field(gt=0.0, le=1.0)]
    crop_mode: Literal[CROP_MODES] = "center"  # type: ignore[valid-type]

    @field_validator("input_size")
    @classmethod
    def _rgb_of_sane_size(cls, size: list[int]) -> list[int]:
        channels, height, width = size
        if channels != 3 or not all(MIN_INPUT_SIDE <= side <= MAX_INPUT_SIDE for side in (height, width)):
            raise ValueError(f"expected [3, height, width] (RGB), each side from {MIN_INPUT_SIDE} to {MAX_INPUT_SIDE} px")
        return size

    @field_validator("crop_pct")
    @classmethod
    def _bounded_resize(cls, crop_pct: float, info: ValidationInfo) -> float:
        size = info.data.get("input_size")
        if size and max(size[1:]) / crop_pct > MAX_RESIZE_SIDE:
            raise ValueError(
                f"a crop of {crop_pct:g} resizes each image to {max(size[1:]) / crop_pct:.0f} px to crop {max(size[1:])}; "
                f"expected at most {MAX_RESIZE_SIDE} px (a larger crop_pct)"
            )
        return crop_pct


class LoraRecord(_Record):
    kind: Literal["lora"]
    rank: Width
    alpha: Annotated[FiniteFloat, Field(gt=0.0)]
    target_modules: Annotated[list[Name], Field(min_length=1)]


class UnknownRecord(_Record):
    """The "none of these" detector (`graft.shipping.unknown`); its tensors are in unknown.safetensors."""

    method: Literal["knn", "mahalanobis"]
    threshold: FiniteFloat
    feature_dim: Width
    k: Width = 1
    kept_share: Share = 0.95
    val_rejected: Share = 0.0


class BundleDocument(_Record):
    """graft.json: the fields graft writes (`graft.api.train`) and reads, with their ranges."""

    format_version: StrictInt
    graft_version: StrictStr | None = None
    backbone: BackboneRecord
    class_names: Annotated[list[Name], Field(min_length=2)]
    preprocessing: PreprocessingRecord
    head: HeadRecord
    strategy: StrictStr | None = None
    precision: Literal["fp32", "bf16"] | None = None
    val_accuracy: Share | None = None
    adapters: LoraRecord | None = None
    # The calibration temperature the logits are divided by (graft.training.calibration); 1: none.
    temperature: Annotated[FiniteFloat, Field(ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE)] = 1.0
    # Multi-label bundles (`graft.shipping.multilabel`): sigmoid scores, one threshold per class name.
    task: Literal["classification", "multilabel"] = "classification"
    thresholds: list[Share] | None = None

    @model_validator(mode="after")
    def _thresholds_per_label(self) -> "BundleDocument":
        if self.task == "multilabel" and (self.thresholds is None or len(self.thresholds) != len(self.class_names)):
            raise ValueError(f"thresholds: a multilabel bundle has one threshold per class name ({len(self.class_names)})")
        return self
    unknown: UnknownRecord | None = None

    @field_validator("class_names")
    @classmethod
    def _unique(cls, names: list[str]) -> list[str]:
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"expected unique names, {', '.join(map(repr, repeated[:3]))} appear more than once")
        return names


# --- 1. the document ----------------------------------------------------------------------------


def read_document(meta_path: Path) -> tuple[dict[str, Any], BundleDocument]:
    """graft.json as parsed, and validated against `BundleDocument`."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise BundleError(f"{meta_path}: not valid JSON ({str(exc)[:200]}); {DAMAGED}") from None
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_path}: expected a JSON object (the bundle's metadata), got {_shown(meta)}; {DAMAGED}")
    version = meta.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > BUNDLE_FORMAT:
        raise BundleError(
            f"{meta_path}: format_version: bundle format {version!r} is newer than this graft understands "
            f"(format {BUNDLE_FORMAT}); upgrade graft (`pip install -U graft`)"
        )
    if "format_version" not in meta:
        raise BundleError(f"{meta_path}: format_version is missing (expected {BUNDLE_FORMAT} for this graft); {DAMAGED}")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BundleError(
            f"{meta_path}: format_version: expected the bundle format, an integer ({BUNDLE_FORMAT} for this graft), "
            f"got {_shown(version)}; {DAMAGED}"
        )
    try:
        document = BundleDocument.model_validate(meta)
    except ValidationError as error:
        raise BundleError(f"{meta_path}: {_describe(error)}; {DAMAGED}") from None
    return meta, document


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors(include_url=False):
        field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in item["loc"]).lstrip(".")
        if item["type"] == "missing":
            problems.append(f"{field} is missing")
            continue
        message = item["msg"]
        if item["type"] == "value_error":  # the validators' own words, without pydantic's prefix
            message = str(item.get("ctx", {}).get("error", message))
        elif item["type"] in ("model_type", "model_attributes_type", "dict_type"):
            message = "expected a JSON object"
        problems.append(f"{field}: {message[:1].lower()}{message[1:]} (got {_shown(item['input'])})")
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


def _shown(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, type(None), bool)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- 2. the document against the weights --------------------------------------------------------


def check_head(meta_path: Path, document: BundleDocument, shapes: dict[str, tuple[int, ...]]) -> None:
    """The head graft.json describes is the one in model.safetensors, and it has one output per class name."""

    head = document.head
    with torch.device("meta"):  # shapes only: a tampered width allocates nothing
        expected = {f"head.{k}": tuple(v.shape) for k, v in make_head(HeadSpec(**head.model_dump())).state_dict().items()}
    found = {k: v for k, v in shapes.items() if k.startswith("head.")}
    where = "the head in model.safetensors"
    if set(expected) != set(found):
        raise BundleError(
            f"{meta_path}: head.kind {head.kind!r} has the layers {', '.join(expected)}, but {where} has "
            f"{', '.join(found) or 'none'}; {DAMAGED}"
        )
    weights = [k for k in expected if k.endswith(".weight")]
    outputs, inputs = found[weights[-1]][0], found[weights[0]][-1]
    if head.num_classes != outputs:
        raise BundleError(f"{meta_path}: head.num_classes is {head.num_classes} but {where} has {outputs} outputs; {DAMAGED}")
    if len(document.class_names) != outputs:
        raise BundleError(
            f"{meta_path}: class_names has {len(document.class_names)} names but {where} has {outputs} outputs; {DAMAGED}"
        )
    if head.in_features != inputs:
        raise BundleError(f"{meta_path}: head.in_features is {head.in_features} but {where} takes {inputs} features; {DAMAGED}")
    if head.kind == "mlp" and head.hidden != found[weights[0]][0]:
        raise BundleError(f"{meta_path}: head.hidden is {head.hidden} but {where} has {found[weights[0]][0]} hidden units; {DAMAGED}")
    for name, shape in expected.items():
        if found[name] != shape:
            raise BundleError(f"{meta_path}: head: {name} is {list(found[name])} in model.safetensors, expected {list(shape)}; {DAMAGED}")


def check_adapters(meta_path: Path, document: BundleDocument, shapes: dict[str, tuple[int, ...]]) -> None:
    """graft.json records LoRA adapters exactly when model.safetensors holds them, of the recorded rank."""

    adapter_shapes = {k: v for k, v in shapes.items() if is_adapter_parameter(k)}
    adapters = document.adapters
    if adapters is None:
        if adapter_shapes:
            raise BundleError(
                f"{meta_path}: adapters is missing, but model.safetensors holds LoRA adapter weights "
                f"({next(iter(adapter_shapes))}, ...); {DAMAGED}"
            )
        return
    if not adapter_shapes:
        raise BundleError(f"{meta_path}: adapters records LoRA adapters, but model.safetensors holds none; {DAMAGED}")
    ranks = {shape[0] for name, shape in adapter_shapes.items() if ".lora_A." in name}
    if ranks != {adapters.rank}:
        raise BundleError(
            f"{meta_path}: adapters.rank is {adapters.rank} but the adapters in model.safetensors have rank "
            f"{', '.join(map(str, sorted(ranks))) or 'none'}; {DAMAGED}"
        )


def check_weights(meta_path: Path, document: BundleDocument, expected: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """The model built from graft.json has exactly the tensors of model.safetensors, shape for shape."""

    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    reshaped = [k for k in expected if k in shapes and tuple(expected[k].shape) != shapes[k]]
    if not (missing or unexpected or reshaped):
        return
    details = [f"missing {', '.join(missing[:3])}"] if missing else []
    details += [f"unexpected {', '.join(unexpected[:3])}"] if unexpected else []
    details += [f"{k} is {list(shapes[k])}, expected {list(expected[k].shape)}" for k in reshaped[:3]]
    # LoRA wraps each target layer (`conv.weight` becomes `conv.base_layer.weight`): keys that
    # differ only there mean other targets, not another architecture.
    adapter_keys = [k for k in missing + unexpected if is_adapter_parameter(k) or ".base_layer." in k]
    if document.adapters is not None and adapter_keys and not reshaped:
        raise BundleError(
            f"{meta_path}: adapters.target_modules does not name the layers adapted in model.safetensors "
            f"({'; '.join(details)}); {DAMAGED}"
        )
    raise BundleError(
        f"{meta_path}: backbone.architecture {document.backbone.architecture!r} does not match the weights in "
        f"model.safetensors ({'; '.join(details)}); {DAMAGED}"
    )


# --- 3. one blank image through it all ----------------------------------------------------------


def check_runs(meta_path: Path, bundle: "Bundle") -> None:
    """A blank image, preprocessed as predict does, gives one finite logit per class."""
    from PIL import Image


    meta = bundle.meta
    channels, height, width = bundle.preprocessing.input_size
    image = Image.new("RGB", (width, height), (128, 128, 128))
    try:
        tensor = bundle.transform(image)
    except Exception as exc:
        raise BundleError(f"{meta_path}: preprocessing cannot be applied ({type(exc).__name__}: {exc}); {DAMAGED}") from None
    if tuple(tensor.shape) != (channels, height, width):
        raise BundleError(
            f"{meta_path}: preprocessing gives images of shape {list(tensor.shape)}, not its input_size "
            f"{[channels, height, width]}; {DAMAGED}"
        )
    model = bundle.model
    batch = tensor.unsqueeze(0).contiguous(memory_format=torch.channels_last)
    architecture, pooling = meta["backbone"]["architecture"], meta["backbone"].get("pooling", "avg")
    # One small image: one thread is faster than waking a pool (graft.speed.numerics.intra_op_threads).
    with torch.no_grad(), intra_op_threads(1):
        try:
            features = model.backbone(batch)
        except Exception as exc:
            raise BundleError(
                f"{meta_path}: preprocessing.input_size {[channels, height, width]} cannot go through "
                f"{architecture!r} pooled by {pooling!r} ({type(exc).__name__}: {str(exc)[:200]}); {DAMAGED}"
            ) from None
        in_features = int(meta["head"]["in_features"])
        if features.ndim != 2 or features.shape[1] != in_features:
            raise BundleError(
                f"{meta_path}: backbone.pooling {pooling!r} gives {architecture!r} features of shape "
                f"{list(features.shape[1:])}, but the head in model.safetensors takes {in_features}; {DAMAGED}"
            )
        logits = model.head(features)
    if not bool(torch.isfinite(logits).all()):
        raise BundleError(f"{meta_path.parent / 'model.safetensors'}: the model gives non-finite logits for a blank image; {DAMAGED}")


def safetensors_shapes(model_path: Path) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor in a safetensors file, from its header (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(model_path), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as exc:
        raise BundleError(f"{model_path}: cannot be read as safetensors ({exc}); {DAMAGED}") from None
