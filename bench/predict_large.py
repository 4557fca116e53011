"""Predicting 12-megapixel phone photos: decoded at the size the model needs against at full size.

The files: foolbox's 20 ImageNet JPEGs and 7 real photos of skimage.data, enlarged to 4032x3024
(a 12 MP phone photo) and saved as JPEG (quality 90); each photo is also stored turned the way a
phone's sensor holds it, with the EXIF orientation tag (3, 6, 8) that turns it upright.

Agreement: EfficientNet-Lite0's ImageNet classifier on each file decoded in full
(`load_image(path)`) and decoded for the model (`load_image(path, min_size=resize_size)`) with
`REDUCING_GAP` 4 and 2: top-1 agreement, the largest probability difference, the smallest cosine
of the pooled features, and the reference noise of saving the full picture again as a JPEG at
quality 85. Speed: `Bundle.predict` images/s of one tiny bundle on the 4032x3024 JPEGs in full and
for the model, and on the 224 px originals, alternated in one process; then `load_image` alone.

    python bench/predict_large.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, task_folder, write_results  # noqa: E402

import graft  # noqa: E402
from graft.input import images  # noqa: E402
from graft.input.preprocessing import build_transforms  # noqa: E402
from graft.models.backbones import load_backbone  # noqa: E402

PHONE_SIZE = (4032, 3024)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
# EXIF orientation -> the turn that stores an upright picture the way the sensor saw it.
SENSOR_TURN = {1: None, 3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def phone_jpeg(picture: Image.Image, path: Path, orientation: int = 1) -> Path:
    """`picture` enlarged to 12 MP (landscape, or portrait when taller) and saved as a phone would."""
    size = PHONE_SIZE if picture.width >= picture.height else PHONE_SIZE[::-1]
    upright = picture.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    stored = upright.transpose(SENSOR_TURN[orientation]) if SENSOR_TURN[orientation] else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, "JPEG", quality=90, exif=exif.tobytes())
    return path


def make_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(the 224 px foolbox JPEGs, the 12 MP files made from them and from the skimage photos)."""
    import foolbox
    import skimage.data

    small = sorted((Path(foolbox.__file__).parent / "data").glob("imagenet_*.jpg"))
    large = [phone_jpeg(Image.open(path), folder / f"{path.stem}.jpg") for path in small]
    for name in PHOTOS:
        picture = Image.fromarray(getattr(skimage.data, name)())
        for orientation in SENSOR_TURN:
            large.append(phone_jpeg(picture, folder / f"{name}-o{orientation}.jpg", orientation))
    return small, large


def agreement(large: list[Path]) -> list[dict]:
    backbone = load_backbone("efficientnet_lite0", keep_classifier=True)
    transform = build_transforms(backbone.preprocessing)
    min_size = backbone.preprocessing.resize_size

    def outputs(pictures: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            features = backbone.model(torch.stack([transform(p) for p in pictures]))
            return features, backbone.imagenet_classifier(features).softmax(1)

    full = [images.load_image(path) for path in large]
    reference_features, reference = outputs(full)
    rows = []

    def compare(name: str, pictures: list[Image.Image]) -> None:
        assert [p.size[0] > p.size[1] for p in pictures] == [p.size[0] > p.size[1] for p in full], "orientation lost"
        features, probabilities = outputs(pictures)
        cosine = torch.nn.functional.cosine_similarity(features, reference_features, dim=1)
        rows.append({
            "decoded": name,
            "short side": f"{min(min(p.size) for p in pictures)}-{max(min(p.size) for p in pictures)}",
            "top-1 agree": f"{int((probabilities.argmax(1) == reference.argmax(1)).sum())}/{len(pictures)}",
            "max |dp|": float((probabilities - reference).abs().max()),
            "mean max |dp|": float((probabilities - reference).abs().max(1).values.mean()),
            "1 - min cosine": f"{float(1 - cosine.min()):.1e}",
        })

    saved_default = images.REDUCING_GAP
    try:
        for gap in (4, 2):
            images.REDUCING_GAP = gap
            compare(f"min_size, REDUCING_GAP {gap}", [images.load_image(path, min_size=min_size) for path in large])
    finally:
        images.REDUCING_GAP = saved_default
    compare("full, saved again at JPEG q85", [_resaved(picture) for picture in full])
    return rows


def _resaved(picture: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=85)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def speed(small: list[Path], large: list[Path], repeats: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as runs:
        run = graft.train(task_folder(5) / "train", out=Path(runs) / "run", strategy="feature-extract", epochs=3, verbose=False)
        bundle = graft.load_bundle(run.run_dir)
    decode_for_model = images.load_image

    def full_size(source, **kwargs):  # the decoding `Bundle.predict` did without min_size
        kwargs.pop("min_size", None)
        return decode_for_model(source, **kwargs)

    def gap_four(source, **kwargs):  # decoded for the model keeping 4x the resize, not REDUCING_GAP
        saved, images.REDUCING_GAP = images.REDUCING_GAP, 4
        try:
            return decode_for_model(source, **kwargs)
        finally:
            images.REDUCING_GAP = saved

    cases = {"224 px JPEGs": (small, decode_for_model), "12 MP, decoded for the model": (large, decode_for_model),
             "12 MP, for the model, gap 4": (large, gap_four), "12 MP, decoded in full": (large, full_size)}
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    try:
        for _ in range(repeats):
            for name, (files, loader) in cases.items():
                images.load_image = loader
                start = time.perf_counter()
                bundle.predict(files, batch_size=32)
                seconds[name].append((time.perf_counter() - start) / len(files))
    finally:
        images.load_image = decode_for_model
    for name in ("12 MP, decoded for the model", "12 MP, for the model, gap 4", "12 MP, decoded in full"):
        loader = cases[name][1]
        decode = []
        for _ in range(repeats):
            start = time.perf_counter()
            for path in large:
                loader(path, min_size=bundle.preprocessing.resize_size)
            decode.append((time.perf_counter() - start) / len(large))
        seconds[f"{name}: load_image only"] = decode
        cases[f"{name}: load_image only"] = cases[name]
    return [{"files": name, "images/s": 1 / statistics.median(s), "min-max": f"{1 / max(s):.1f}-{1 / min(s):.1f}",
             "count": len(cases[name][0])} for name, s in seconds.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as folder:
        small, large = make_files(Path(folder))
        rows = agreement(large)
        print_table(rows, ["decoded", "short side", "top-1 agree", "max |dp|", "mean max |dp|", "1 - min cosine"])
        timings = speed(small, large, args.repeats)
        print_table(timings, ["files", "count", "images/s", "min-max"])
    write_results("predict_large", rows, {"speed": timings})


if __name__ == "__main__":
    main()
