"""Does `torch.compile` pay off for a frozen backbone's forward? Compile time against the gain.

The bundled EfficientNet-Lite0 (or `--model NAME`, a timm architecture with random weights), forward
only, in-memory tensors, in the default precision (bf16 autocast where native) and channels_last;
on the CPU with 2 threads and batch 64, on CUDA batch 256. Reports the one-off compile time, the
compiled ÷ eager time per batch (interleaved, median), and the number of images after which
compiling starts to save time.

    python bench/compile_forward.py [--device cpu|cuda] [--batch-size N] [--model NAME] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import max_rss_mb, print_table, write_results  # noqa: E402

from graft.input.pipeline import default_batch_size  # noqa: E402
from graft.models.backbones import load_backbone  # noqa: E402
from graft.speed.numerics import autocast, resolve_precision  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 on CPU, 256 on CUDA")
    parser.add_argument("--model", default=None, help="a timm architecture, random weights (default: the bundled Lite0)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(2)
    batch_size = args.batch_size or default_batch_size(device)
    precision = resolve_precision("auto", device)
    model = load_backbone().model if args.model is None else timm.create_model(args.model, pretrained=False)
    model = model.eval().to(device, memory_format=torch.channels_last)
    batch = torch.randn(batch_size, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)

    def run(module) -> float:
        started = time.perf_counter()
        with torch.inference_mode(), autocast(precision, device):
            module(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
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
    row = {"device": str(device), "model": args.model or "tf_efficientnet_lite0 (bundled)", "batch": batch_size, "precision": precision,
           "compile_seconds": compile_seconds, "compiled_vs_eager": ratio,
           "eager_img_s": len(batch) / statistics.median(eager), "compiled_img_s": len(batch) / statistics.median(fast),
           "break_even_images": break_even, "max_rss_mb": max_rss_mb()}
    print_table([row], list(row))
    print("written", write_results(f"compile_forward_{device.type}", [row]))


if __name__ == "__main__":
    main()
