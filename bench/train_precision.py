"""A CPU training step in fp32, in bf16 autocast, and in graft's bf16 (depthwise convolutions in fp32).

EfficientNet-Lite0 + a linear head, a batch of 32 real 20-shot Fashion-MNIST images at 224 px,
AdamW, channels_last, on the CPU. Two steps, each in three numeric paths, interleaved and repeated:
- full: everything trains, from the images;
- top 2 stages on the cached prefix: what `lp-ft` (and auto's few-shot rule) runs, the last two
  stages + head on the frozen prefix's cached activations for the same 32 images.
The paths: fp32; bf16 autocast on every layer; graft's (`numerics.train_depthwise_in_fp32`: bf16
autocast, the depthwise convolutions that are trained or pass a gradient in fp32). Median seconds
per step and median of the per-repetition ratios to fp32, with min-max.

    python bench/train_precision.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import Timer, max_rss_mb, print_table, training_batch, write_results  # noqa: E402

from graft.config import TrainConfig  # noqa: E402
from graft.models.backbones import load_backbone  # noqa: E402
from graft.models.heads import HeadSpec, make_head  # noqa: E402
from graft.models.model import GraftModel  # noqa: E402
from graft.models.prefix import Chain, sequential_chain, split_index  # noqa: E402
from graft.models.stages import discover_stages  # noqa: E402
from graft.speed.numerics import autocast, cpu_supports_bf16, train_depthwise_in_fp32  # noqa: E402
from graft.strategies.finetune import Full, apply_trainability, param_groups  # noqa: E402
from graft.training.features import extract_features  # noqa: E402

PATHS = {"fp32": "fp32", "bf16 everywhere": "bf16", "graft: bf16, depthwise fp32": "bf16"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if not cpu_supports_bf16():
        sys.exit("this CPU has no native bf16: there is nothing to compare (graft trains in fp32 here)")
    torch.set_num_threads(2)
    device = torch.device("cpu")
    backbone = load_backbone()
    paths, digests, targets = training_batch()
    stages = discover_stages(backbone.model)
    config = TrainConfig(data=".", out=".")
    images = extract_features(backbone, paths, digests, cache=None, precision="fp32", model=nn.Identity())
    images = images.contiguous(memory_format=torch.channels_last)
    chain = sequential_chain(backbone.model, backbone.preprocessing.input_size)
    position = split_index(chain, stages, len(stages) - 2)
    prefix = Chain(chain[:position])
    prefix_out = extract_features(backbone, paths, digests, cache=None, precision="bf16", model=prefix)
    prefix_out = prefix_out.contiguous(memory_format=torch.channels_last)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    plan = Full().plan(stages, config)

    steps = {}
    for path, precision in PATHS.items():
        model = GraftModel(copy.deepcopy(backbone.model), make_head(HeadSpec(kind="linear", in_features=backbone.num_features, num_classes=10)))
        model.to(memory_format=torch.channels_last)
        apply_trainability(model, stages, plan.trainable_at(0), plan)
        if path.startswith("graft"):
            train_depthwise_in_fp32(model)
        suffix = nn.Sequential(Chain(sequential_chain(model.backbone, backbone.preprocessing.input_size)[position:]), model.head)
        for what, network, inputs in (("full", model, images), ("top 2 stages on the cached prefix", suffix, prefix_out)):
            optimizer = torch.optim.AdamW(param_groups(model, stages, plan, 1e-4) if what == "full" else suffix.parameters())
            steps[(what, path)] = _step(network, inputs, targets, loss_fn, optimizer, precision, device)

    for step in steps.values():
        step()  # warm-up: oneDNN's kernels, the allocator
    seconds: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for _ in range(args.repeats):
        for key, step in steps.items():
            with Timer() as timer:
                step()
            seconds[key].append(timer.seconds)
    rows = []
    for (what, path), times in seconds.items():
        ratios = [t / f for t, f in zip(times, seconds[(what, "fp32")])]
        rows.append({"step": what, "path": path, "seconds": statistics.median(times), "ratio_to_fp32": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios)})
    print_table(rows, ["step", "path", "seconds", "ratio_to_fp32", "ratio_min", "ratio_max"])
    rss = max_rss_mb()
    print(f"batch 32 at 224 px, prefix up to {prefix.names[-1]} cached, {args.repeats} repetitions, 2 threads; max RSS {rss:.0f} MB")
    print("written", write_results("train_precision", rows, {"repeats": args.repeats, "max_rss_mb": rss}))


def _step(network, inputs, targets, loss_fn, optimizer, precision, device):
    def step() -> None:
        network.train()
        with autocast(precision, device):
            logits = network(inputs)
        loss = loss_fn(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


if __name__ == "__main__":
    main()
