"""The evaluation transform's PIL part per image: Resize + CenterCrop fused into one resize of the
crop's box (`pipeline.ResizeCenterCrop`, what graft runs) beside the two torchvision steps.

Each repetition opens and decodes every file, then runs the PIL part to uint8 pixels, one thread,
no model: the work of graft's decode thread and of its worker processes per image. The two are
alternated and repeated; median ms per image, and the median of the per-repetition ratios (fused ÷
two steps, with min-max). The pixels are checked equal first. Also the decode path alone
(`image_batches`, decode thread, no model, nothing stored) as images/s: how far decoding is ahead of
a model (the extraction ratio of bench/extraction.py is decoding beside the model on the same cores).

    python bench/decode.py [--images 960] [--repeats 6]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import Timer, max_rss_mb, print_table, task_folder, write_results  # noqa: E402

from graft.input import pipeline  # noqa: E402
from graft.input.data import load_labelled_folder  # noqa: E402
from graft.input.images import load_image  # noqa: E402
from graft.input.preprocessing import build_transforms  # noqa: E402
from graft.models.backbones import load_backbone  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=960)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    backbone = load_backbone()
    transform = build_transforms(backbone.preprocessing)
    fused = pipeline.split_transform(transform)
    if not isinstance(fused.pil, pipeline.ResizeCenterCrop):
        raise SystemExit(f"the evaluation transform is not Resize + CenterCrop here: {transform}")
    resize, crop = transform.transforms[:2]

    def two_steps(image):
        return crop(resize(image))

    folders = [load_labelled_folder(task_folder(20) / name)[0] for name in ("train", "valid")]
    paths = [p for f in folders for p in f.paths][: args.images]
    keep_gray = fused.channel_blind
    for path in paths[:50]:
        image = load_image(path, keep_gray=keep_gray)
        if not np.array_equal(np.asarray(fused.pil(image)), np.asarray(two_steps(image))):
            raise SystemExit(f"fused pixels differ from the two steps' on {path}")

    def per_image(pil) -> None:
        for path in paths:
            np.asarray(pil(load_image(path, keep_gray=keep_gray)))

    def decode_path() -> None:
        for _ in pipeline.image_batches(paths, transform, batch_size=64, store=None):
            pass

    methods = {"fused (graft)": lambda: per_image(fused.pil), "two steps (torchvision)": lambda: per_image(two_steps),
               "decode path alone (graft)": decode_path}
    for method in methods.values():
        method()  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    for repeat in range(args.repeats):
        order = list(methods) if repeat % 2 == 0 else list(reversed(methods))
        for name in order:
            with Timer() as timer:
                methods[name]()
            seconds[name].append(timer.seconds)
    base = seconds["two steps (torchvision)"]
    rows = []
    for name, times in seconds.items():
        ratios = [t / b for t, b in zip(times, base)]
        rows.append({"method": name, "ms_per_image": 1000 * statistics.median(times) / len(paths),
                     "img_per_s": len(paths) / statistics.median(times),
                     "time_vs_two_steps": statistics.median(ratios), "min": min(ratios), "max": max(ratios)})
    print_table(rows, ["method", "ms_per_image", "img_per_s", "time_vs_two_steps", "min", "max"])
    rss = max_rss_mb()
    print(f"{len(paths)} images, {args.repeats} repetitions; max RSS {rss:.0f} MB")
    print("written", write_results("decode", rows, {"images": len(paths), "repeats": args.repeats, "max_rss_mb": rss}))


if __name__ == "__main__":
    main()
