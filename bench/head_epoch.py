"""One head-training epoch on cached features beside one epoch that re-runs the frozen backbone.

Both train the same new linear head (AdamW, batch 32, cross-entropy with label smoothing 0.1, as
`feature-extract` does) on the 20-shot Fashion-MNIST training images (200) with EfficientNet-Lite0
frozen, in the same precision. The cached epoch is graft's: a matrix multiply per batch on the
features computed once. The re-run epoch is the textbook frozen loop, given graft's fast path
anyway (decode thread, channels_last, the same precision, backbone under no-grad in eval mode), so
the ratio is not flattered by a slow peer. Interleaved; median of per-repetition ratios.

    python bench/head_epoch.py [--repeats 3] [--precision auto]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import Timer, max_rss_mb, print_table, task_folder, write_results  # noqa: E402

from graft.input import pipeline  # noqa: E402
from graft.input.data import load_labelled_folder  # noqa: E402
from graft.input.preprocessing import build_transforms  # noqa: E402
from graft.models.backbones import load_backbone  # noqa: E402
from graft.models.heads import HeadSpec, make_head  # noqa: E402
from graft.speed.numerics import autocast, intra_op_threads, resolve_precision  # noqa: E402
from graft.training.features import extract_features  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--cached-epochs", type=int, default=50, help="cached epochs timed per repetition (their median is used)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    device = torch.device("cpu")
    precision = resolve_precision(args.precision, device)
    backbone = load_backbone()
    split = load_labelled_folder(task_folder(20) / "train")[0]
    labels = torch.tensor(split.labels)
    features = extract_features(backbone, split.paths, split.digests, cache=None, precision=precision)
    spec = HeadSpec(kind="linear", in_features=backbone.num_features, num_classes=int(labels.max()) + 1)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    generator = torch.Generator().manual_seed(0)
    transform = build_transforms(backbone.preprocessing)
    model = backbone.model.eval().to(memory_format=torch.channels_last)

    def head_step(head, optimizer, inputs, targets) -> None:
        loss = loss_fn(head(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def cached_epoch(head, optimizer) -> None:
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), 32):
            index = order[start : start + 32]
            head_step(head, optimizer, features[index], labels[index])

    def rerun_epoch(head, optimizer) -> None:
        pipeline.DECODED.clear()  # the textbook loop decodes every epoch
        order = torch.randperm(len(labels), generator=generator).tolist()
        paths = [split.paths[i] for i in order]
        targets = labels[order]
        for position, batch in enumerate(pipeline.image_batches(paths, transform, batch_size=32, store=None)):
            with torch.no_grad(), autocast(precision, device):
                pooled = model(batch).float()
            head_step(head, optimizer, pooled, targets[position * 32 : position * 32 + 32])

    head = make_head(spec)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    cached_epoch(head, optimizer)
    rerun_epoch(head, optimizer)  # warm-up
    cached, rerun = [], []
    for _ in range(args.repeats):
        per_epoch = []
        for _ in range(args.cached_epochs):
            with Timer() as timer, intra_op_threads(1):  # as graft's train_head runs head epochs
                cached_epoch(head, optimizer)
            per_epoch.append(timer.seconds)
        cached.append(statistics.median(per_epoch))
        with Timer() as timer:
            rerun_epoch(head, optimizer)
        rerun.append(timer.seconds)
    ratios = [c / r for c, r in zip(cached, rerun)]
    rows = [
        {"epoch": "re-run frozen backbone (textbook, fast path)", "precision": precision, "seconds": statistics.median(rerun), "ratio": 1.0},
        {"epoch": "graft: head on cached features", "precision": precision, "seconds": statistics.median(cached),
         "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
         "one_in": 1 / statistics.median(ratios)},
    ]
    print_table(rows, ["epoch", "precision", "seconds", "ratio", "ratio_min", "ratio_max", "one_in"])
    rss = max_rss_mb()
    print(f"{len(labels)} images, batch 32, {args.repeats} repetitions; max RSS {rss:.0f} MB (goal: ratio <= 1/50 = 0.02)")
    print("written", write_results("head_epoch", rows, {"images": len(labels), "repeats": args.repeats, "max_rss_mb": rss}))


if __name__ == "__main__":
    main()
