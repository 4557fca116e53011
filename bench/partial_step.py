"""A `partial` training step (last stage trainable) beside a `full` step, on the same batch.

EfficientNet-Lite0 + a linear head, a batch of 32 real 20-shot Fashion-MNIST images at 224 px,
AdamW, in graft's training mode (channels_last, the precision given; in bf16 on a CPU the
trained depthwise convolutions run in fp32, as `TrainSteps` runs them). Three steps, interleaved:
- full: everything trains (forward, backward through the whole network, optimizer step);
- partial: graft's `partial` plan with `train_stages=1` from images: the frozen prefix has
  requires_grad=False and BatchNorm in eval mode, so autograd records nothing through it;
- partial on cached prefix: what graft actually runs for `partial` (the prefix never thaws), the
  suffix + head on the frozen prefix's cached activations for the same 32 images.
Median of per-repetition ratios to the full step, with min-max.

    python bench/partial_step.py [--repeats 5] [--precision auto fp32]
"""

from __future__ import annotations

import argparse
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
from graft.speed.numerics import autocast, resolve_precision, train_depthwise_in_fp32  # noqa: E402
from graft.strategies.finetune import Full, Partial, apply_trainability, param_groups  # noqa: E402
from graft.training.features import extract_features  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", nargs="+", default=["auto", "fp32"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    device = torch.device("cpu")
    backbone = load_backbone()
    paths, digests, targets = training_batch()
    stages = discover_stages(backbone.model)
    config = TrainConfig(data=".", out=".", train_stages=1)
    model = GraftModel(backbone.model, make_head(HeadSpec(kind="linear", in_features=backbone.num_features, num_classes=10)))
    model.to(memory_format=torch.channels_last)
    train_depthwise_in_fp32(model)  # acts only under CPU bf16 autocast, as in graft's TrainSteps
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    full_plan, partial_plan = Full().plan(stages, config), Partial().plan(stages, config)
    chain = sequential_chain(backbone.model, backbone.preprocessing.input_size)
    first = partial_plan.trainable_at(0).index(True)
    position = split_index(chain, stages, first)
    prefix, suffix = Chain(chain[:position]), Chain(chain[position:])
    rows = []
    for asked in args.precision:
        precision = resolve_precision(asked, device)
        images = extract_features(backbone, paths, digests, cache=None, precision="fp32", model=nn.Identity())
        images = images.contiguous(memory_format=torch.channels_last)
        prefix_out = extract_features(backbone, paths, digests, cache=None, precision=precision, model=prefix)
        prefix_out = prefix_out.contiguous(memory_format=torch.channels_last)
        optimizers = {
            "full": torch.optim.AdamW(param_groups(model, stages, full_plan, 1e-4)),
            "partial": torch.optim.AdamW(param_groups(model, stages, partial_plan, 1e-4)),
        }
        suffix_and_head = nn.Sequential(suffix, model.head)

        def step(name: str) -> None:
            plan = full_plan if name == "full" else partial_plan
            apply_trainability(model, stages, plan.trainable_at(0), plan)
            with autocast(precision, device):
                if name == "partial on cached prefix":
                    logits = suffix_and_head(prefix_out)
                else:
                    logits = model(images)
            loss = loss_fn(logits.float(), targets)
            optimizer = optimizers["full" if name == "full" else "partial"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        names = ["full", "partial", "partial on cached prefix"]
        for name in names:
            step(name)  # warm-up
        seconds: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.repeats):
            for name in names:
                with Timer() as timer:
                    step(name)
                seconds[name].append(timer.seconds)
        for name in names:
            ratios = [t / f for t, f in zip(seconds[name], seconds["full"])]
            rows.append({"precision": precision, "step": name, "seconds": statistics.median(seconds[name]),
                         "ratio_to_full": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)})
        print_table([r for r in rows if r["precision"] == precision], ["precision", "step", "seconds", "ratio_to_full", "ratio_min", "ratio_max"])
        print()
    rss = max_rss_mb()
    print(f"batch 32 at 224 px, last stage of {len(stages)} trainable ({', '.join(suffix.names)}), {args.repeats} repetitions; max RSS {rss:.0f} MB (goal: partial <= 0.6 x full)")
    print("written", write_results("partial_step", rows, {"repeats": args.repeats, "max_rss_mb": rss, "suffix": suffix.names}))


if __name__ == "__main__":
    main()
