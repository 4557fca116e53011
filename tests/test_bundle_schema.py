"""A tampered or mismatched graft.json is refused at load with one BundleError naming the field.

Every case edits the graft.json of a real trained bundle (the `trained_run` fixture, Fashion-MNIST)
in a copy of its folder; the LoRA cases use that bundle with real (untrained) peft adapters
injected and saved by `save_bundle`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

from graft.errors import BundleError
from graft.shipping.bundle import META_FILE, load_bundle, save_bundle


NULL = object()  # an edit's result that makes graft.json the JSON document `null`


def _tampered(source: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], Any]) -> Path:
    """A copy of the bundle at `source` whose graft.json is `edit`'s result (or the edited document)."""
    folder = Path(shutil.copytree(source, tmp_path / "bundle"))
    meta = json.loads((folder / META_FILE).read_text())
    result = edit(meta)
    (folder / META_FILE).write_text("null" if result is NULL else json.dumps(meta if result is None else result))
    return folder


def _set(*path_and_value: Any) -> Callable[[dict[str, Any]], None]:
    *path, value = path_and_value

    def edit(meta: dict[str, Any]) -> None:
        for key in path[:-1]:
            meta = meta[key]
        meta[path[-1]] = value

    return edit


def _remove(*path: str) -> Callable[[dict[str, Any]], None]:
    def edit(meta: dict[str, Any]) -> None:
        for key in path[:-1]:
            meta = meta[key]
        del meta[path[-1]]

    return edit


LORA = {"kind": "lora", "rank": 4, "alpha": 4.0, "target_modules": ["conv_stem", "conv_head"]}

TAMPERED = {
    "fewer class_names than outputs": (_set("class_names", ["bag", "sneaker"]),
                                       r"class_names has 2 names but the head in model\.safetensors has 3 outputs"),
    "more class_names than outputs": (_set("class_names", ["bag", "sneaker", "trouser", "coat"]), r"class_names has 4 names"),
    "a repeated class name": (_set("class_names", ["bag", "bag", "trouser"]), r"class_names: expected unique names, 'bag'"),
    "a blank class name": (_set("class_names", ["bag", " ", "trouser"]), r"class_names\[1\]: expected a name, not an empty or blank string"),
    "class names that are not strings": (_set("class_names", [0, 1, 2]), r"class_names\[0\]: input should be a valid string"),
    "another num_classes": (_set("head", "num_classes", 5), r"head\.num_classes is 5 but the head in model\.safetensors has 3 outputs"),
    "another in_features": (_set("head", "in_features", 1000), r"head\.in_features is 1000 but .* takes 1280 features"),
    "another head kind": (_set("head", "kind", "mlp"), r"head\.kind 'mlp' has the layers head\.0\.weight"),
    "an unknown head kind": (_set("head", "kind", "conv"), r"head\.kind: input should be 'linear' or 'mlp'"),
    "another architecture": (_set("backbone", "architecture", "tf_efficientnet_lite1"),
                             r"backbone\.architecture 'tf_efficientnet_lite1' does not match the weights in model\.safetensors"),
    "an architecture timm does not know": (_set("backbone", "architecture", "efficientnet_lite9"),
                                           r"backbone\.architecture 'efficientnet_lite9' is not a model of the installed timm"),
    "another pooling": (_set("backbone", "pooling", "grid"), r"backbone\.pooling 'grid' gives .* \[11520\], but the head .* takes 1280"),
    "an unknown pooling": (_set("backbone", "pooling", "max"), r"backbone\.pooling: input should be 'avg', 'grid'"),
    "std 0": (_set("preprocessing", "std", [0.5, 0.0, 0.5]), r"preprocessing\.std\[1\]: input should be greater than or equal to"),
    "a mean of two numbers": (_set("preprocessing", "mean", [0.5, 0.5]), r"preprocessing\.mean: list should have at least 3 items"),
    "a NaN mean": (_set("preprocessing", "mean", [float("nan"), 0.5, 0.5]), r"preprocessing\.mean\[0\]: input should be a finite number"),
    "a negative input_size": (_set("preprocessing", "input_size", [3, -224, 224]), r"preprocessing\.input_size: expected \[3, height, width\]"),
    "a huge input_size": (_set("preprocessing", "input_size", [3, 100_000, 100_000]), r"preprocessing\.input_size: expected .* to 2048 px"),
    "an input_size of 4 channels": (_set("preprocessing", "input_size", [4, 224, 224]), r"preprocessing\.input_size"),
    "an unknown interpolation": (_set("preprocessing", "interpolation", "cubic"), r"preprocessing\.interpolation: input should be 'nearest'"),
    "a crop_pct of 0": (_set("preprocessing", "crop_pct", 0), r"preprocessing\.crop_pct: input should be greater than 0"),
    "a crop_pct as a string": (_set("preprocessing", "crop_pct", "0.875"), r"preprocessing\.crop_pct: input should be a valid number"),
    "an unknown crop_mode": (_set("preprocessing", "crop_mode", "zoom"), r"preprocessing\.crop_mode"),
    "adapters as a string": (_set("adapters", "lora"), r"adapters: expected a JSON object \(got 'lora'\)"),
    "adapters where the weights have none": (_set("adapters", LORA), r"adapters records LoRA adapters, but model\.safetensors holds none"),
    "a null document": (lambda meta: NULL, r"expected a JSON object \(the bundle's metadata\), got null"),
    "an empty list as the document": (lambda meta: [], r"expected a JSON object \(the bundle's metadata\), got \[\]"),
    "a format_version that is not a number": (_set("format_version", "one"), r"format_version: expected the bundle format, an integer \(1"),
    "format_version 0": (_set("format_version", 0), r"format_version: expected the bundle format"),
    "no backbone": (_remove("backbone"), r"backbone is missing"),
    "an unknown precision": (_set("precision", "fp8"), r"precision: input should be 'fp32' or 'bf16'"),
    "a val_accuracy over 1": (_set("val_accuracy", 1.5), r"val_accuracy: input should be less than or equal to 1"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_tampered_graft_json_is_refused_naming_the_field(trained_run, tmp_path, case):
    edit, expected = TAMPERED[case]
    folder = _tampered(trained_run.bundle_dir, tmp_path, edit)
    with pytest.raises(BundleError, match=expected) as error:
        load_bundle(folder)
    message = str(error.value)
    assert message.startswith(f"{folder / META_FILE}: ") and "\n" not in message
    assert message.endswith("copy it again from its training run, or re-train it")


@pytest.fixture(scope="module")
def lora_bundle(trained_run, holdout_folder, tmp_path_factory) -> Path:
    """The trained bundle with peft LoRA adapters on two layers, saved as graft saves one (and loading)."""
    from graft.models.lora import apply_lora

    bundle = load_bundle(trained_run.bundle_dir)
    adapters = apply_lora(bundle.model, rank=4, alpha=4.0, target_modules=["conv_stem", "conv_head"])
    meta = {k: v for k, v in bundle.meta.items() if k not in ("format_version", "graft_version")}
    folder = save_bundle(tmp_path_factory.mktemp("lora") / "bundle", bundle.model, {**meta, "adapters": adapters},
                         unknown=bundle.unknown)
    images = sorted(holdout_folder.rglob("*.png"))[:3]
    # Untampered, it loads and predicts as the bundle it was made from (lora_B starts at zero).
    assert [p.label for p in load_bundle(folder).predict(images)] == [p.label for p in bundle.predict(images)]
    return folder


@pytest.mark.parametrize(
    "edit, expected",
    [
        (_remove("adapters"), r"adapters is missing, but model\.safetensors holds LoRA adapter weights"),
        (_set("adapters", "rank", 8), r"adapters\.rank is 8 but the adapters in model\.safetensors have rank 4"),
        (_set("adapters", "rank", 10**9), r"adapters\.rank is 1000000000 but"),
        (_set("adapters", "target_modules", ["conv_stem"]), r"adapters\.target_modules does not name the layers adapted"),
        (_set("adapters", "target_modules", ["no_such_layer"]), r"adapters\.target_modules: Target modules \{'no_such_layer'\} not found"),
        (_set("adapters", "kind", "dora"), r"adapters\.kind: input should be 'lora'"),
        (_set("adapters", "alpha", -1), r"adapters\.alpha: input should be greater than 0"),
    ],
    ids=["removed", "another rank", "a huge rank", "fewer targets", "an unknown target", "another kind", "a negative alpha"],
)
def test_tampered_lora_adapters_are_refused_naming_the_field(lora_bundle, tmp_path, edit, expected):
    with pytest.raises(BundleError, match=expected):
        load_bundle(_tampered(lora_bundle, tmp_path, edit))


@pytest.mark.parametrize("command", ["predict", "evaluate", "export", "serve"])
def test_the_cli_reports_a_tampered_bundle_in_one_line(trained_run, holdout_folder, tmp_path, capsys, command):
    from graft.cli.main import main

    folder = _tampered(trained_run.bundle_dir, tmp_path, _set("head", "num_classes", 5))
    extra = {"predict": [str(holdout_folder)], "evaluate": [str(holdout_folder)], "export": ["--onnx"], "serve": []}[command]
    code = main([command, str(folder), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("graft: error: ") and err.count("\n") == 1 and "head.num_classes is 5" in err
