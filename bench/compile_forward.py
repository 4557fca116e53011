"""Does `torch.compile` pay off for extraction on this CPU? Compile time against the gain.

The bundled EfficientNet-Lite0, forward only, batch 64 of in-memory tensors, 2 threads, in the
default precision (bf16 autocast where native) and channels_last. Reports the one-off compile time,
the eager ÷ compiled time per batch (interleaved, median), and the number of images after which
compiling starts to save time.

    python bench/compile_cpu.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import max_rss_mb, print_table, write_results  # noqa: E402

from graft.backbones import load_backbone  # noqa: E402
from graft.numerics import autocast, resolve_precision  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    device = torch.device("cpu")
    precision = resolve_precision("auto", device)
    model = load_backbone().model.eval().to(memory_format=torch.channels_last)
    batch = torch.randn(64, 3, 224, 224).contiguous(memory_format=torch.channels_last)

    def run(module) -> float:
        started = time.perf_counter()
        with torch.inference_mode(), autocast(precision, device):
            module(batch)
        return time.perf_counter() - started

    compiled = torch.compile(model)
    started = time.perf_counter()
    run(compiled)  # the first call compiles
    compile_seconds = time.perf_counter() - started
    eager, fast = [], []
    run(model)
    for _ in range(args.repeats):
        eager.append(run(model))
        fast.append(run(compiled))
    ratio = statistics.median(c / e for c, e in zip(fast, eager))
    saved_per_image = (statistics.median(eager) - statistics.median(fast)) / len(batch)
    break_even = compile_seconds / saved_per_image if saved_per_image > 0 else float("inf")
    row = {"precision": precision, "compile_seconds": compile_seconds, "compiled_vs_eager": ratio,
           "eager_img_s": len(batch) / statistics.median(eager), "compiled_img_s": len(batch) / statistics.median(fast),
           "break_even_images": break_even, "max_rss_mb": max_rss_mb()}
    print_table([row], list(row))
    print("written", write_results("compile_cpu", [row]))


if __name__ == "__main__":
    main()
