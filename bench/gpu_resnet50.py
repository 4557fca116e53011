"""ResNet-50 fine-tuning throughput on one CUDA GPU: the bar is >= 2 500 images/s at 224 px, bf16.

Architecture only (timm `resnet50`, random weights: no download), 1 000 classes, batch 256,
channels_last, bf16 autocast, AdamW, every parameter trained, data already on the GPU (this
measures the training step, the model's ceiling; feeding it from files needs the worker-process
pipeline, `graft.pipeline.image_batches(workers=N, pin_memory=True)`). Optionally torch.compile,
with its compile time reported beside the steady-state speed. Interleaving eager and compiled is
not possible within one compiled module, so each variant reports its median over timed windows.
Runs only where CUDA exists; elsewhere it says so and exits 0.

    python bench/gpu_resnet50.py [--batch-size 256] [--steps 50] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import max_rss_mb, print_table, write_results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per window")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu_resnet50.py needs a CUDA GPU; none is available here, so nothing was measured.")
        return
    import timm

    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    images = torch.randn(args.batch_size, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (args.batch_size,), device=device)
    rows = []
    variants = ["eager"] + (["compiled"] if args.compile else [])
    for variant in variants:
        model = timm.create_model("resnet50", pretrained=False, num_classes=1000).to(device).to(memory_format=torch.channels_last).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        loss_fn = nn.CrossEntropyLoss()
        forward = torch.compile(model) if variant == "compiled" else model

        def step() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(forward(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(3):  # warm-up: cuDNN autotuning, and compilation for the compiled variant
            step()
        torch.cuda.synchronize()
        warmup_seconds = time.perf_counter() - started
        throughputs = []
        for _ in range(args.windows):
            torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
            throughputs.append(args.steps * args.batch_size / (time.perf_counter() - started))
        rows.append({"variant": variant, "img_per_s": statistics.median(throughputs), "min": min(throughputs), "max": max(throughputs),
                     "warmup_seconds": warmup_seconds, "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20,
                     "meets_2500": statistics.median(throughputs) >= 2500})
        del model, optimizer, forward
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    print_table(rows, ["variant", "img_per_s", "min", "max", "warmup_seconds", "peak_gpu_mb", "meets_2500"])
    print(f"{torch.cuda.get_device_name()}, batch {args.batch_size}, bf16 autocast, channels_last; max RSS {max_rss_mb():.0f} MB")
    print("written", write_results("gpu_resnet50", rows, {"device": torch.cuda.get_device_name(), "batch_size": args.batch_size}))


if __name__ == "__main__":
    main()
