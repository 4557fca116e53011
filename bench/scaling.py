"""How cost grows with images: `feature-extract` on 1x, 4x and 16x the 20-shot task.

Each size runs in its own process (so max RSS is its own): 20, 80 and 320 Fashion-MNIST training
images per class (200, 800, 3 200 images; graft's seeded 80/20 split makes validation scale with
them), a fresh feature cache, 30 head epochs (no early stop), default precision ("auto").
Reported: wall seconds of `graft.train` (loading, checks, extraction, head epochs, report),
seconds per image relative to 1x (1.0 = perfectly linear), and the process's max RSS.

    python bench/scaling.py [--multiples 1 4 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import max_rss_mb, print_table, task_folder, write_results  # noqa: E402


def child(multiple: int) -> None:
    import torch

    import graft

    torch.set_num_threads(2)
    root = task_folder(20 * multiple)
    with tempfile.TemporaryDirectory(prefix="graft-scaling-") as scratch:
        started = time.perf_counter()
        run = graft.train(root / "train", out=Path(scratch) / "run", cache_dir=str(Path(scratch) / "cache"),
                          strategy="feature-extract", epochs=30, patience=30, verbose=False)
        seconds = time.perf_counter() - started
    print(json.dumps({"images": run.metrics["num_train"] + run.metrics["num_val"], "seconds": seconds,
                      "max_rss_mb": max_rss_mb(), "val_accuracy": run.metrics["accuracy"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--multiples", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    rows = []
    for multiple in args.multiples:
        task_folder(20 * multiple)  # written before timing
        done = subprocess.run([sys.executable, __file__, "--child", str(multiple)], capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append({"multiple": f"{multiple}x", **result, "ms_per_image": 1000 * result["seconds"] / result["images"]})
    base = rows[0]["ms_per_image"]
    for row in rows:
        row["per_image_vs_1x"] = row["ms_per_image"] / base
    print_table(rows, ["multiple", "images", "seconds", "ms_per_image", "per_image_vs_1x", "max_rss_mb", "val_accuracy"])
    print("per_image_vs_1x <= 1 means cost grows linearly in images or better; one process per size")
    print("written", write_results("scaling", rows))


if __name__ == "__main__":
    main()
