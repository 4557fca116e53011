"""Phone photos against the same photos at 224 px: graft predict, training-time extraction, torchvision.

The files: 48 JPEGs (quality 90) made from scikit-image's photos (astronaut, coffee, chelsea,
rocket; each its own seeded crop, `graft.input.sample_data.write_photos`) at 4032x3024, a
12 MP phone photo, and the same crops at 299x224. With pillow-heif installed, 12 of them as
HEIC too (one per photo).

Measured, interleaved over `--repeats` rounds, each configuration in a child process of its own
(so its max RSS is its own; timing starts after the model is loaded and warmed up), medians:
- `predict`: `graft.predict` (what `graft predict` runs) with a bundle trained on the 224 px
  photos (feature-extract, 5 epochs), batch 32.
- `extraction`: what `graft train` does before training: `load_dataset` with the check that is
  the run's first decode (`eval_view_check`), then `extract_features` of every image (no cache).
- `torchvision`: the pipeline a user writes by hand: `ImageFolder` + `DataLoader` (2 workers,
  batch 32) with Resize(256, bicubic), CenterCrop(224), ToTensor, Normalize(0.5, 0.5), then
  the same bundle's model forward under `inference_mode`.
Agreement: the ImageNet classifier of EfficientNet-Lite0 on every file decoded in full and as
graft decodes it (`load_image(min_size=resize_size)`): top-1 agreement and the smallest feature
cosine. With simplejpeg or PyTurboJPEG importable (not graft dependencies), their scaled JPEG
decode is timed against Pillow's `draft` on the phone files; and hashing a file (the content
key of the feature cache) against decoding it.

    python bench/photos.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, print_table, write_results  # noqa: E402

import graft  # noqa: E402
from graft.input.data import load_dataset  # noqa: E402
from graft.input.images import load_image  # noqa: E402
from graft.input.pipeline import eval_view_check  # noqa: E402
from graft.input.sample_data import write_photos  # noqa: E402
from graft.models.backbones import load_backbone  # noqa: E402
from graft.training.features import extract_features  # noqa: E402

PER_CLASS = 12


def make_files(folder: Path) -> dict[str, Path]:
    """The photo folders (class sub-folders) by name: phone, small, and heic when pillow-heif can
    write it (one file per class: x265 takes minutes per 12 MP picture on a loaded 2-core machine);
    kept in `folder` for the next run."""
    folders = {"phone": folder / "phone", "small": folder / "small"}
    if not (folder / ".complete").exists():
        write_photos(folders["phone"], PER_CLASS)
        write_photos(folders["small"], PER_CLASS, size=(299, 224))
        (folder / ".complete").write_text("ok\n")
    try:
        import pillow_heif
        from PIL import Image
    except ImportError:
        return folders
    folders["heic"] = folder / "heic"
    for path in sorted(folders["phone"].glob("*/*-0.jpg")):
        target = folders["heic"] / path.parent.name / f"{path.stem}.heic"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            pillow_heif.from_pillow(Image.open(path)).save(target, quality=90, enc_params={"preset": "ultrafast"})
    return folders


def files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*/*") if p.suffix in (".jpg", ".heic"))


# --- one measured configuration, in a child process ------------------------------------------------


def child(kind: str, folder: Path, bundle_dir: Path) -> dict:
    """Seconds for one pass of `kind` over `folder`, after the model is loaded and warmed up."""
    torch.set_num_threads(2)
    bundle = graft.load_bundle(bundle_dir)
    bundle.logits([load_image(files_of(folder)[0], min_size=256)])  # warm-up: folding, first allocations
    files = files_of(folder)
    start = time.perf_counter()
    if kind == "predict":
        count = sum(1 for _ in graft.predict(bundle, files, batch_size=32))
    elif kind == "extraction":
        dataset = load_dataset(folder, decode=eval_view_check(bundle.preprocessing))
        paths, digests = dataset.train.paths + dataset.val.paths, dataset.train.digests + dataset.val.digests
        backbone = load_backbone(bundle.meta["backbone"]["name"])  # the frozen backbone of a feature-extract bundle
        count = len(extract_features(backbone, paths, digests, cache=None, precision=bundle.precision))
    else:
        count = _torchvision_pass(bundle, folder)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": count, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _torchvision_pass(bundle, folder: Path) -> int:
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(224),
        transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3),
    ])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(folder, transform=transform), batch_size=32, num_workers=2)
    model = bundle.model.eval()
    count = 0
    with torch.inference_mode():
        for images, _ in loader:
            model(images)
            count += len(images)
    return count


# --- the parent: files, bundle, interleaved children, agreement ------------------------------------


def speed(folders: dict[str, Path], bundle_dir: Path, repeats: int) -> list[dict]:
    cases = [("predict", "small"), ("predict", "phone"), ("extraction", "small"), ("extraction", "phone"),
             ("torchvision", "phone")] + ([("predict", "heic")] if "heic" in folders else [])
    runs: dict[tuple[str, str], list[dict]] = {case: [] for case in cases}
    for repeat in range(repeats):
        for kind, files in cases:
            say(f"round {repeat + 1}/{repeats}: {kind} on {files}")
            out = subprocess.run([sys.executable, __file__, "--child", kind, str(folders[files]), str(bundle_dir)],
                                 check=True, capture_output=True, text=True).stdout
            runs[(kind, files)].append(json.loads(out.strip().splitlines()[-1]))
            last = runs[(kind, files)][-1]
            say(f"  {last['images'] / last['seconds']:.2f} img/s ({last['seconds']:.1f} s), max RSS {last['max_rss_mb']:.0f} MB")
    rows = []
    for (kind, files), measured in runs.items():
        rates = [m["images"] / m["seconds"] for m in measured]
        rows.append({"pipeline": kind, "files": files, "images": measured[0]["images"], "images/s": statistics.median(rates),
                     "min-max": f"{min(rates):.1f}-{max(rates):.1f}", "max RSS MB": max(m["max_rss_mb"] for m in measured)})
    rate = {(r["pipeline"], r["files"]): r["images/s"] for r in rows}
    for row in rows:
        if row["files"] != "small" and (row["pipeline"], "small") in rate:
            row["x 224 px"] = row["images/s"] / rate[(row["pipeline"], "small")]
        if row["files"] == "phone" and row["pipeline"] != "torchvision":
            row["x torchvision"] = row["images/s"] / rate[("torchvision", "phone")]
    return rows


def agreement(folders: dict[str, Path]) -> dict:
    """Top-1 agreement and feature cosine of graft's decode against the full decode, on every file."""
    from graft.input.preprocessing import build_transforms

    backbone = load_backbone("efficientnet_lite0", keep_classifier=True)
    transform, min_size = build_transforms(backbone.preprocessing), backbone.preprocessing.resize_size
    same, cosines, count = 0, [], 0
    with torch.inference_mode():
        for path in files_of(folders["phone"]) + (files_of(folders["heic"]) if "heic" in folders else []):
            pair = torch.stack([transform(load_image(path)), transform(load_image(path, min_size=min_size))])
            features = backbone.model(pair)
            classes = backbone.imagenet_classifier(features).argmax(1)
            same += int(classes[0] == classes[1])
            cosines.append(float(torch.nn.functional.cosine_similarity(features[:1], features[1:])))
            count += 1
    return {"files": count, "top-1 agreement": same / count, "min feature cosine": min(cosines)}


def decoders(folder: Path, repeats: int) -> list[dict]:
    """Per-file seconds of Pillow's draft decode, the maintained libjpeg-turbo bindings, and SHA-256."""
    import io

    from PIL import Image

    datas = [p.read_bytes() for p in files_of(folder)]

    def pillow(data: bytes, side: int = 512) -> None:
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (side, side))
        image.load()

    cases = {"Pillow draft (graft)": pillow, "Pillow full decode": lambda data: Image.open(io.BytesIO(data)).load(),
             "SHA-256 of the file": lambda data: hashlib.sha256(data).digest()}
    try:
        import simplejpeg

        cases["simplejpeg min 512"] = lambda data: simplejpeg.decode_jpeg(data, min_height=512, min_width=512)
    except ImportError:
        pass
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG

        turbo = TurboJPEG()
        cases["PyTurboJPEG scale 1/4"] = lambda data: turbo.decode(data, scaling_factor=(1, 4), pixel_format=TJPF_RGB)
    except (ImportError, RuntimeError, OSError):
        pass
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, decode in cases.items():
            start = time.perf_counter()
            for data in datas:
                decode(data)
            seconds[name].append((time.perf_counter() - start) / len(datas))
    base = statistics.median(seconds["Pillow draft (graft)"])
    return [{"decoder": name, "ms per file": 1000 * statistics.median(s), "x Pillow draft": statistics.median(s) / base}
            for name, s in seconds.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=3, metavar=("KIND", "FOLDER", "BUNDLE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), Path(args.child[2]))))
        return
    torch.set_num_threads(2)
    load = os.getloadavg()
    folders = make_files(RESULTS / "data" / "photos")
    say("files ready; training the bundle")
    with tempfile.TemporaryDirectory() as folder:
        run = graft.train(folders["small"], out=Path(folder) / "run", strategy="feature-extract", epochs=5,
                          precision="fp32", verbose=False)
        rows = speed(folders, run.bundle_dir, args.repeats)
    print_table(rows, ["pipeline", "files", "images", "images/s", "min-max", "x 224 px", "x torchvision", "max RSS MB"])
    say("agreement")
    agree = agreement(folders)
    print(f"fast vs full decode on {agree['files']} files: top-1 agreement {agree['top-1 agreement']:.3f}, "
          f"min feature cosine {agree['min feature cosine']:.5f}")
    decoding = decoders(folders["phone"], args.repeats)
    print_table(decoding, ["decoder", "ms per file", "x Pillow draft"])
    load_after = os.getloadavg()
    print(f"load average (1 min) before the run: {load[0]:.2f}, after: {load_after[0]:.2f}")
    write_results("photos", rows, {"agreement": agree, "decoders": decoding, "load_average": [load[0], load_after[0]]})


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
