"""ResNet-50 fine-tuning throughput on one CUDA GPU: the bar is >= 2 500 images/s at 224 px, bf16.

Architecture only (timm `resnet50`, random weights: no download), 1 000 classes, batch 256, every
parameter trained (graft's `full` plan), bf16 autocast, channels_last. `--model` times another
timm architecture the same way (the compiled-step figures of `graft.speed.compiling` for the default
backbone: `--model tf_efficientnet_lite0 --batch-size 32 --compile`). Rows, timed side by side:

- `bare step`: the textbook step written out (autocast forward, loss, AdamW fused): the ceiling;
- `graft step`: graft's own training step (`graft.training.loop.TrainSteps` over `GraftModel`, the `full`
  strategy's parameter groups, `make_optimizer`, the warmup-cosine schedule) on the same batch;
  these two alternate window by window, so their ratio is measured in one stretch of time;
- `graft step, compiled` (`--compile`): the same under `torch.compile`, compile time reported;
- `graft step from files` (`--files N`): the same step fed by graft's training input path
  (`training_loader`: `training_workers` processes, light augmentation, uint8 pixels in pinned
  memory, normalised on the GPU) from N JPEG files made from scikit-image's real photos (480 px),
  each read `--file-passes` times per epoch; beside it the same workers sending normalised
  float32 batches (the textbook DataLoader); and `input path alone` for each, the same epoch with
  no training step (how fast the CPU side can feed the GPU).

Runs only where CUDA exists; elsewhere it says so and exits 0.

    python bench/gpu_resnet50.py [--model resnet50] [--batch-size 256] [--steps 30] [--windows 5] [--compile] [--files 2560]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import max_rss_mb, print_table, write_results  # noqa: E402


def graft_parts(name: str, batch_size: int, device: torch.device):
    """GraftModel(`name` backbone, linear head) with graft's full plan, optimizer and schedule."""
    from graft.models.backbones import load_backbone
    from graft.config import TrainConfig
    from graft.models.heads import HeadSpec, make_head
    from graft.training.loop import make_optimizer, warmup_cosine_schedule
    from graft.models.model import GraftModel
    from graft.models.stages import discover_stages
    from graft.strategies.finetune import Full, apply_trainability, param_groups

    backbone = load_backbone(name, pretrained=False)
    stages = discover_stages(backbone.model)
    config = TrainConfig(data=".", out=".", strategy="full", batch_size=batch_size, bn_stats="update")
    plan = Full().full_plan(stages, config)
    model = GraftModel(backbone.model, make_head(HeadSpec("linear", backbone.num_features, 1000)))
    model.to(device).to(memory_format=torch.channels_last)
    apply_trainability(model, stages, plan.trainable_at(0), plan)
    optimizer = make_optimizer(param_groups(model, stages, plan, config.weight_decay), device)
    scheduler = warmup_cosine_schedule(optimizer, epochs=100, steps_per_epoch=100, warmup_epochs=1)
    return model, optimizer, scheduler, backbone.preprocessing


def bare_parts(name: str, device: torch.device):
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=1000).to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    loss_fn = nn.CrossEntropyLoss()

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def timed(step, batches, steps: int, batch_size: int) -> float:
    """Images/s over `steps` steps (synchronised before and after)."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    for i in range(steps):
        step(*batches[i % len(batches)])
    torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - started)


def photo_files(folder: Path, count: int) -> tuple[list[Path], list[int]]:
    """`count` JPEGs (480 px on the long side) cut from scikit-image's real photos, 10 labels."""
    import numpy as np
    from PIL import Image
    from skimage import data

    photos = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")]
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = photo.crop((x, y, x + cw, y + ch))
        crop.thumbnail((480, 480))
        path = folder / f"{i:05d}.jpg"
        crop.save(path, quality=90)
        paths.append(path)
        labels.append(i % 10)
    return paths, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet50", help="any timm architecture (random weights); the bar is for resnet50")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per window")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune-no-cudagraphs")
    parser.add_argument("--files", type=int, default=0, help="also train from this many JPEG files")
    parser.add_argument("--file-passes", type=int, default=6, help="times each file is read per epoch")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu_resnet50.py needs a CUDA GPU; none is available here, so nothing was measured.")
        return
    from graft.training.loop import TrainSteps

    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    batch = args.batch_size
    generator = torch.Generator(device=device).manual_seed(0)
    # Several input sets, so that repeated steps do not all read one buffer.
    batches = [(torch.randn(batch, 3, 224, 224, device=device, generator=generator).contiguous(memory_format=torch.channels_last),
                torch.randint(0, 1000, (batch,), device=device, generator=generator)) for _ in range(4)]

    bare = bare_parts(args.model, device)
    model, optimizer, scheduler, preprocessing = graft_parts(args.model, batch, device)
    step = TrainSteps(model, nn.CrossEntropyLoss(), optimizer, scheduler, precision="bf16", device=device)
    warm = {}
    for name, fn in (("bare step", bare), ("graft step", step)):
        torch.cuda.synchronize()
        started = time.perf_counter()
        timed(fn, batches, 5, batch)  # cuDNN autotuning
        warm[name] = time.perf_counter() - started
    speeds: dict[str, list[float]] = {"bare step": [], "graft step": []}
    for _ in range(args.windows):  # alternate, so both see the same stretch of time
        speeds["bare step"].append(timed(bare, batches, args.steps, batch))
        speeds["graft step"].append(timed(step, batches, args.steps, batch))
    step.epoch_result()
    rows = [{"variant": name, "img_per_s": statistics.median(v), "min": min(v), "max": max(v), "warmup_seconds": warm[name]}
            for name, v in speeds.items()]
    ratios = [g / b for g, b in zip(speeds["graft step"], speeds["bare step"])]
    rows[1]["vs_bare"] = statistics.median(ratios)

    if args.compile:
        compiled = TrainSteps(torch.compile(model, mode=args.compile_mode), nn.CrossEntropyLoss(), optimizer, scheduler, precision="bf16", device=device)
        torch.cuda.synchronize()
        started = time.perf_counter()
        timed(compiled, batches, 5, batch)
        compile_seconds = time.perf_counter() - started
        values = [timed(compiled, batches, args.steps, batch) for _ in range(args.windows)]
        rows.append({"variant": f"graft step, compiled ({args.compile_mode})", "img_per_s": statistics.median(values), "min": min(values), "max": max(values),
                     "warmup_seconds": compile_seconds, "vs_bare": statistics.median(values) / rows[0]["img_per_s"]})

    if args.files:
        from torch.utils.data import DataLoader

        from graft.input.preprocessing import build_transforms
        from graft.strategies.finetune import LabelledImageFiles, training_loader, training_workers

        folder = Path(tempfile.mkdtemp(prefix="graft-gpu-bench-"))
        made = time.perf_counter()
        paths, labels = photo_files(folder, args.files)
        print(f"wrote {len(paths)} JPEGs in {time.perf_counter() - made:.1f} s")
        # Each file several times per epoch (decoded and augmented anew each time, as in training),
        # so that an epoch is long beside the workers' start and the first batches' latency.
        paths, labels = paths * args.file_passes, labels * args.file_passes
        workers = training_workers(len(paths), device)
        generator = torch.Generator().manual_seed(0)
        # graft's input path (uint8 from the workers, normalised on the GPU), and the same workers
        # sending normalised float32 batches instead (the textbook DataLoader, graft's CPU path).
        uint8_loader, prepare = training_loader(paths, labels, preprocessing, augment="light", batch_size=batch,
                                                device=device, generator=generator, drop_last=True)
        float_loader = DataLoader(LabelledImageFiles(paths, labels, build_transforms(preprocessing, augment="light")),
                                  batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=True,
                                  pin_memory=True, drop_last=True)
        uint8_step = TrainSteps(model, nn.CrossEntropyLoss(), optimizer, scheduler, precision="bf16", device=device, prepare=prepare)

        def epoch_speed(loader, train_step) -> float:
            torch.cuda.synchronize()
            started, seen = time.perf_counter(), 0
            for images, targets in loader:
                if train_step is not None:
                    train_step(images, targets)
                seen += len(targets)
            torch.cuda.synchronize()
            return seen / (time.perf_counter() - started)

        for name, loader, train_step in (("uint8, normalised on the GPU", uint8_loader, uint8_step),
                                         ("float32 from the workers", float_loader, step)):
            epoch_speed(loader, None)  # starts the worker processes
            data_only = epoch_speed(loader, None)
            from_files = epoch_speed(loader, train_step)
            train_step.epoch_result()
            rows.append({"variant": f"input path alone: {name} ({workers} workers)", "img_per_s": data_only,
                         "vs_bare": data_only / rows[0]["img_per_s"]})
            rows.append({"variant": f"graft step from files: {name}", "img_per_s": from_files,
                         "vs_bare": from_files / rows[0]["img_per_s"]})

    for row in rows:
        row["meets_2500"] = row["img_per_s"] >= 2500
    print_table(rows, ["variant", "img_per_s", "min", "max", "vs_bare", "warmup_seconds", "meets_2500"])
    print(f"{args.model}, {torch.cuda.get_device_name()}, torch {torch.__version__}, batch {batch}, bf16 autocast, channels_last; "
          f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; max RSS {max_rss_mb():.0f} MB")
    name = "gpu_resnet50" if args.model == "resnet50" else f"gpu_train_step_{args.model}"
    print("written", write_results(name, rows, {"device": torch.cuda.get_device_name(), "model": args.model, "batch_size": batch}))


if __name__ == "__main__":
    main()
