"""Feature extraction from image files beside the bare forward pass on in-memory tensors.

The ceiling: EfficientNet-Lite0's forward on a batch already decoded, resized and normalised in
memory (channels_last, same precision, same threads). Against it, per precision, interleaved in
one run and repeated (median of the per-repetition ratios, with min–max):
- graft: `extract_features` from the PNG files (decode thread one batch ahead), decoded-image
  store off, so every repetition decodes every file;
- graft, second pass: the same images again with the decoded-image store on (what validation every
  epoch, `lp-ft`, `compare` and `evaluate` in one process get);
- graft with one DataLoader worker process instead of the decode thread;
- plain: the textbook `DataLoader(num_workers=0)` over the timm transform, fp32 NCHW (the
  24 img/s of shared/benchmarks.md was this).

In fp32 graft's forward has its BatchNorm layers folded into the convolutions (`graft.speed.folding`),
which the eager model has not: that forward, on the same in-memory tensors, is a second ceiling
(`ratio_to_folded`), the one that says how well graft's own model is fed.

    python bench/extraction.py [--images 960] [--repeats 5] [--precisions fp32 bf16]   (up to 1 200 images)

On a GPU (`--device cuda`): the ceiling's batches already lie on the GPU, graft decodes with its
default worker processes, batch 256, and up to 10 000 images (the 1000-shot task's training set)
can be asked for; the one-worker and plain-DataLoader rows are CPU-only.

    python bench/extraction.py --device cuda --images 10000 --precisions bf16
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Timer, max_rss_mb, print_table, task_folder, write_results  # noqa: E402

from graft.input import pipeline  # noqa: E402
from graft.input.data import load_labelled_folder  # noqa: E402
from graft.input.pipeline import default_batch_size  # noqa: E402
from graft.input.preprocessing import build_transforms  # noqa: E402
from graft.models.backbones import load_backbone  # noqa: E402
from graft.speed.folding import folded_for_inference  # noqa: E402
from graft.speed.numerics import cpu_supports_bf16  # noqa: E402
from graft.training.features import ImageFiles, extract_features, forward_batches  # noqa: E402


FOLDED = "ceiling, BatchNorm folded (graft's fp32 forward)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=960)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 on CPU, 256 on CUDA")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="which to measure (bf16 only where this CPU runs it natively)")
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(2)
    args.batch_size = args.batch_size or default_batch_size(device)
    backbone = load_backbone()
    model = backbone.model.eval().to(memory_format=torch.channels_last)
    # The 20-shot task's training then validation images (1 200): a run's extraction is that long.
    # More (a GPU's run): the 1000-shot task's 10 000 training images.
    sources = [(20, "train"), (20, "valid")] if args.images <= 1200 else [(1000, "train")]
    folders = [load_labelled_folder(task_folder(shots) / name)[0] for shots, name in sources]
    paths = [p for f in folders for p in f.paths][: args.images]
    digests = [d for f in folders for d in f.digests][: args.images]
    count = len(paths)
    transform = build_transforms(backbone.preprocessing)
    in_memory = torch.stack([transform(ImageFiles(paths, lambda x: x)[i]) for i in range(count)])
    in_memory = in_memory.contiguous(memory_format=torch.channels_last)
    batches = [batch.to(device) for batch in in_memory.split(args.batch_size)]
    precisions = [p for p in args.precisions if p == "fp32" or on_gpu or cpu_supports_bf16()]

    def ceiling(precision: str) -> None:
        forward_batches(model, batches, precision=precision, device=device)

    def folded_ceiling(precision: str) -> None:
        forward_batches(folded_for_inference(model, backbone.preprocessing.input_size), batches, precision=precision, device=device)

    def graft_files(precision: str, workers: int | None = None) -> None:
        pipeline.DECODED.clear()  # every repetition decodes every file
        extract_features(backbone, paths, digests, cache=None, precision=precision, batch_size=args.batch_size,
                         num_workers=workers, device=device)

    def graft_second_pass(precision: str) -> None:
        extract_features(backbone, paths, digests, cache=None, precision=precision, batch_size=args.batch_size, device=device)

    # The textbook row's own NCHW copy: converting graft's model back and forth would give its
    # weights new storage every repetition, and graft would fold them again inside a timed row.
    plain = copy.deepcopy(backbone.model).to(memory_format=torch.contiguous_format).eval()

    def plain_fp32_nchw(precision: str) -> None:
        loader = torch.utils.data.DataLoader(ImageFiles(paths, transform), batch_size=args.batch_size, num_workers=0)
        with torch.inference_mode():
            for batch in loader:
                plain(batch)

    files = "graft from files (worker processes)" if on_gpu else "graft from files (decode thread)"
    methods = {"ceiling (tensors in memory)": ceiling, FOLDED: folded_ceiling, files: graft_files}
    if not on_gpu:
        methods["graft from files (1 worker process)"] = lambda p: graft_files(p, workers=1)
    methods["graft, images already decoded"] = graft_second_pass
    rows = []
    for precision in precisions:
        # graft folds BatchNorm in fp32 only (graft.speed.folding): the folded ceiling is graft's there.
        measured = {name: method for name, method in methods.items() if name != FOLDED or precision == "fp32"}
        for method in measured.values():  # warm-up: one-off allocations, oneDNN kernels
            method(precision)
        seconds: dict[str, list[float]] = {name: [] for name in measured}
        seconds["plain DataLoader, fp32 NCHW"] = []
        for _ in range(args.repeats):
            for name, method in measured.items():
                with Timer() as timer:
                    method(precision)
                seconds[name].append(timer.seconds)
            if precision == "fp32" and not on_gpu:
                with Timer() as timer:
                    plain_fp32_nchw(precision)
                seconds["plain DataLoader, fp32 NCHW"].append(timer.seconds)
        base = seconds["ceiling (tensors in memory)"]
        for name, times in seconds.items():
            if not times:
                continue
            ratios = [b / t for b, t in zip(base, times)]
            folded = seconds.get(FOLDED)
            rows.append({
                "precision": precision, "method": name,
                "img_per_s": count / statistics.median(times),
                "ratio_to_ceiling": statistics.median(ratios),
                "ratio_min": min(ratios), "ratio_max": max(ratios),
                "ratio_to_folded": statistics.median(f / t for f, t in zip(folded, times)) if folded else None,
            })
        print_table([r for r in rows if r["precision"] == precision],
                    ["precision", "method", "img_per_s", "ratio_to_ceiling", "ratio_min", "ratio_max", "ratio_to_folded"])
        print()
    rss = max_rss_mb()
    where = torch.cuda.get_device_name(device) if on_gpu else f"torch threads {torch.get_num_threads()}"
    print(f"{count} images, batch {args.batch_size}, {args.repeats} repetitions, {where}; max RSS {rss:.0f} MB")
    extra = {"images": count, "repeats": args.repeats, "max_rss_mb": rss, "device": where}
    print("written", write_results("extraction" if not on_gpu else "extraction_cuda", rows, extra))


if __name__ == "__main__":
    main()
