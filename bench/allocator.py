"""What raising glibc's malloc thresholds (`graft.speed.allocator`, done by `load_backbone`) is worth.

The bundled EfficientNet-Lite0 on 2 threads, channels_last, in fp32 and bf16: the forward over
in-memory batches of 64 (extraction's ceiling) and a `full` training step on batches of 32. Each
window is a fresh process, with `GRAFT_TUNE_MALLOC=0` (glibc's defaults, as any PyTorch process
starts) or graft's thresholds, alternating; a process warms up, then times its work. A fresh
process per window matters: once a heap has grown, even glibc's defaults serve large requests
from its free chunks, so switching the setting back and forth in one process hides the cost.
The table gives the median of the per-pair ratios, minor page faults per image and max RSS.

    python bench/allocator.py [--repeats 3] [--images 320]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, write_results  # noqa: E402

WORKS = ("forward, batch 64", "training step, batch 32")


def window(precision: str, work: str, images: int) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    from graft.speed import allocator
    from graft.models.backbones import load_backbone
    from graft.speed.numerics import autocast

    torch.set_num_threads(2)
    device = torch.device("cpu")
    model = load_backbone().model.to(memory_format=torch.channels_last)
    inputs = torch.rand(images, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (images,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def forward() -> int:
        model.eval()
        with torch.inference_mode(), autocast(precision, device):
            for batch in inputs.split(64):
                model(batch)
        return len(inputs)

    def train_steps() -> int:
        model.train()
        count = 0
        for batch, target in zip(inputs.split(32), labels.split(32)):
            with autocast(precision, device):
                loss = torch.nn.functional.cross_entropy(model(batch).float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            count += len(batch)
        return count

    run = forward if work == WORKS[0] else train_steps
    run()  # warm-up: oneDNN kernels, and the heap's growth where the thresholds are raised
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    started = time.perf_counter()
    count = run()
    seconds = time.perf_counter() - started
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return {"seconds_per_image": seconds / count, "faults_per_image": faults / count,
            "tuned": allocator.reuse_freed_memory(), "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--window", nargs=2, metavar=("PRECISION", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.window:
        print(json.dumps(window(args.window[0], args.window[1], args.images)))
        return

    from graft.speed.numerics import cpu_supports_bf16

    def measure(precision: str, work: str, tune: str) -> dict:
        env = {**os.environ, "GRAFT_TUNE_MALLOC": tune}
        done = subprocess.run([sys.executable, __file__, "--images", str(args.images), "--window", precision, work],
                              env=env, capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        if result["tuned"] != (tune == "1"):
            raise SystemExit("the thresholds could not be set here (needs Linux with glibc)")
        return result

    rows = []
    for precision in ["fp32"] + (["bf16"] if cpu_supports_bf16() else []):
        for work in WORKS:
            default, tuned = [], []
            for _ in range(args.repeats):
                default.append(measure(precision, work, "0"))
                tuned.append(measure(precision, work, "1"))
            speedups = [d["seconds_per_image"] / t["seconds_per_image"] for d, t in zip(default, tuned)]
            rows.append({
                "precision": precision, "work": work,
                "default_img_s": 1 / statistics.median(d["seconds_per_image"] for d in default),
                "graft_img_s": 1 / statistics.median(t["seconds_per_image"] for t in tuned),
                "speedup": statistics.median(speedups), "speedup_min": min(speedups), "speedup_max": max(speedups),
                "faults_per_img_default": statistics.median(d["faults_per_image"] for d in default),
                "faults_per_img_graft": statistics.median(t["faults_per_image"] for t in tuned),
                "max_rss_mb_default": max(d["max_rss_mb"] for d in default),
                "max_rss_mb_graft": max(t["max_rss_mb"] for t in tuned),
            })
            print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, list(rows[0]))
    print(f"{args.images} images per window, {args.repeats} pairs of fresh processes, 2 torch threads")
    print("written", write_results("allocator", rows, {"repeats": args.repeats, "images": args.images}))


if __name__ == "__main__":
    main()
