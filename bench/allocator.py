"""What raising glibc's malloc thresholds (`graft.allocator`, done by `load_backbone`) is worth.

The bundled EfficientNet-Lite0 on 2 threads, channels_last, in fp32 and bf16: the forward over
in-memory batches of 64 (extraction's ceiling) and a `full` training step on batches of 32. Each
is timed with glibc's default thresholds (128 KB, as a process starts with) and with graft's
(1 GB), alternating window by window in one process; the table gives the median of the
per-window ratios, the minor page faults per image, and the process's max RSS.

    python bench/allocator.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import max_rss_mb, print_table, write_results  # noqa: E402

from graft import allocator  # noqa: E402
from graft.backbones import load_backbone  # noqa: E402
from graft.numerics import autocast, cpu_supports_bf16  # noqa: E402

GLIBC_DEFAULT_BYTES = 128 * 1024


def set_thresholds(value: int) -> None:
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(allocator._M_MMAP_THRESHOLD, value) and mallopt(allocator._M_TRIM_THRESHOLD, value)):
        raise SystemExit(f"mallopt refused {value} bytes")
    if value == GLIBC_DEFAULT_BYTES:
        ctypes.CDLL(None).malloc_trim(0)  # hand back what the tuned window kept, as a fresh process has none


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=640)
    args = parser.parse_args()
    if not allocator.reuse_freed_memory():
        raise SystemExit("needs Linux with glibc (and GRAFT_TUNE_MALLOC unset)")
    torch.set_num_threads(2)
    device = torch.device("cpu")
    backbone = load_backbone()
    model = backbone.model.to(memory_format=torch.channels_last)
    inputs = torch.rand(args.images, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (args.images,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def forward(precision: str) -> int:
        model.eval()
        with torch.inference_mode(), autocast(precision, device):
            for batch in inputs.split(64):
                model(batch)
        return len(inputs)

    def train_step(precision: str) -> int:
        model.train()
        for batch, target in list(zip(inputs.split(32), labels.split(32)))[:4]:
            with autocast(precision, device):
                loss = torch.nn.functional.cross_entropy(model(batch).float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return 128

    rows = []
    precisions = ["fp32"] + (["bf16"] if cpu_supports_bf16() else [])
    for precision in precisions:
        for name, work in (("forward, batch 64", forward), ("training step, batch 32", train_step)):
            seconds: dict[int, list[float]] = {GLIBC_DEFAULT_BYTES: [], allocator.THRESHOLD_BYTES: []}
            faults: dict[int, list[float]] = {GLIBC_DEFAULT_BYTES: [], allocator.THRESHOLD_BYTES: []}
            for threshold in seconds:  # warm-up of both settings
                set_thresholds(threshold)
                work(precision)
            for _ in range(args.repeats):
                for threshold in seconds:
                    set_thresholds(threshold)
                    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    started = time.perf_counter()
                    count = work(precision)
                    seconds[threshold].append((time.perf_counter() - started) / count)
                    faults[threshold].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / count)
            default, tuned = seconds[GLIBC_DEFAULT_BYTES], seconds[allocator.THRESHOLD_BYTES]
            speedups = [d / t for d, t in zip(default, tuned)]
            rows.append({
                "precision": precision, "work": name,
                "default_img_s": 1 / statistics.median(default), "graft_img_s": 1 / statistics.median(tuned),
                "speedup": statistics.median(speedups), "speedup_min": min(speedups), "speedup_max": max(speedups),
                "faults_per_img_default": statistics.median(faults[GLIBC_DEFAULT_BYTES]),
                "faults_per_img_graft": statistics.median(faults[allocator.THRESHOLD_BYTES]),
            })
            print_table(rows[-1:], list(rows[-1]))
    set_thresholds(allocator.THRESHOLD_BYTES)
    print()
    print_table(rows, ["precision", "work", "default_img_s", "graft_img_s", "speedup", "speedup_min", "speedup_max",
                       "faults_per_img_default", "faults_per_img_graft"])
    rss = max_rss_mb()
    print(f"{args.images} images, {args.repeats} repetitions, torch threads {torch.get_num_threads()}; max RSS {rss:.0f} MB")
    print("written", write_results("allocator", rows, {"repeats": args.repeats, "max_rss_mb": rss}))


if __name__ == "__main__":
    main()
