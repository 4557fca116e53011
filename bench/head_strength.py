"""The L-BFGS head at each L2 strength C: label sets (emoji) and one label per image (Fashion-MNIST).

`--data`: on the emoji task of `bench/emoji_multilabel.py` (its `labels.csv`, with the `split` column), the
frozen EfficientNet-Lite0 features of every image (the backbone's 0.875 crop) pooled by the
average, a 3x3 grid and the grids of the last two and three stages, each fitted by graft's L-BFGS
head (`solve_logistic_regression`, one binary regression per label) at each strength the
multi-label task tries (`MultiLabelTask.l2_strengths`), with and without `--class-weighting
balanced` (each label's positives weighted by its negatives per positive). Prints validation and
test macro mAP; the C a run keeps is the one with the best validation mAP, never the test's.

`--fashion-shots K ...`: on the K-shot Fashion-MNIST task (seed 0), the whole frame's `grid-3`
features (what `auto` keeps at 20 and 100 shots), the single-label head at the same strengths, by
validation and test accuracy.

    python bench/emoji_multilabel.py build --packs /tmp --out /tmp/emoji-task
    python bench/head_strength.py --data /tmp/emoji-task/labels.csv
    python bench/head_strength.py --fashion-shots 20 100
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, task_folder, write_results  # noqa: E402

from graft.input.data import load_labelled_folder  # noqa: E402
from graft.input.multilabel import load_task_dataset  # noqa: E402
from graft.models.backbones import load_backbone, with_crop, with_pooling  # noqa: E402
from graft.models.pooling import earlier_module_names  # noqa: E402
from graft.strategies.feature_extract import solve_logistic_regression  # noqa: E402
from graft.training.features import FeatureCache, SidePooling, backbone_key, default_cache_dir, extract_features  # noqa: E402
from graft.training.metrics import macro_average_precision  # noqa: E402
from graft.training.multilabel import MULTILABEL, positive_weights  # noqa: E402

POOLINGS = ("avg", "grid", "grid-2", "grid-3")
PARTS = ("train", "val", "test")


def pooled_features(csv_path: Path, cache_root: Path) -> tuple[dict, dict]:
    """{pooling: {part: features}} and {part: multi-hot labels}; one backbone pass per image, the
    grids pooled from the average pass's maps (`SidePooling`), everything through graft's cache."""
    dataset = load_task_dataset(csv_path)
    base = load_backbone()

    def cache(backbone):
        return FeatureCache(cache_root, backbone_key(backbone, backbone.preprocessing, "fp32"))

    grids = tuple(SidePooling(p, cache(with_pooling(base, p)), earlier_module_names(base.model, p) or ()) for p in POOLINGS[1:])
    features: dict[str, dict[str, torch.Tensor]] = {p: {} for p in POOLINGS}
    for part in PARTS:
        images = getattr(dataset, part)
        features["avg"][part] = extract_features(base, images.paths, images.digests, cache=cache(base), precision="fp32",
                                                 side_poolings=grids)
        for pooling in POOLINGS[1:]:
            backbone = with_pooling(base, pooling)
            features[pooling][part] = extract_features(backbone, images.paths, images.digests, cache=cache(backbone), precision="fp32")
    return features, {part: torch.as_tensor(np.asarray(getattr(dataset, part).labels)) for part in PARTS}


def fit(features: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], c: float, weighted: bool) -> dict:
    head = nn.Linear(features["train"].shape[1], labels["train"].shape[1])
    started = time.perf_counter()
    weights = positive_weights(labels["train"]) if weighted else None
    solve_logistic_regression(head, features["train"].float(), labels["train"], c=c, class_weight=weights)
    seconds = time.perf_counter() - started
    with torch.no_grad():
        scores = {part: macro_average_precision(labels[part].numpy(), head(features[part].float()).numpy()) for part in ("val", "test")}
    return {"val_map": round(scores["val"], 4), "test_map": round(scores["test"], 4), "seconds": round(seconds, 1)}


def fashion_rows(shots: int, cache_root: Path) -> list[dict]:
    """The single-label head on the K-shot task's whole-frame `grid-3` features at each strength."""
    backbone = with_pooling(with_crop(load_backbone(), 1.0), "grid-3")
    cache = FeatureCache(cache_root, backbone_key(backbone, backbone.preprocessing, "fp32"))
    features, labels = {}, {}
    for part in ("train", "valid", "test"):
        images = load_labelled_folder(task_folder(shots, 0) / part)[0]
        features[part] = extract_features(backbone, images.paths, images.digests, cache=cache, precision="fp32").float()
        labels[part] = torch.tensor(images.labels)
    rows = []
    for c in MULTILABEL.l2_strengths:
        head = nn.Linear(features["train"].shape[1], 10)
        solve_logistic_regression(head, features["train"], labels["train"], c=c)
        with torch.no_grad():
            accuracy = {part: float((head(features[part]).argmax(1) == labels[part]).float().mean()) for part in ("valid", "test")}
        rows.append({"task": f"fashion-{shots}shot", "pooling": "grid-3", "C": c, "val_accuracy": round(accuracy["valid"], 4),
                     "test_accuracy": round(accuracy["test"], 4)})
    return rows


def emoji_rows(csv_path: Path, cache_root: Path, weighted_strengths: list[float]) -> list[dict]:
    features, labels = pooled_features(csv_path, cache_root)
    rows = []
    for pooling in POOLINGS:
        fits = [{"pooling": pooling, "C": c, "weighting": "none", **fit(features[pooling], labels, c, False)}
                for c in MULTILABEL.l2_strengths]
        max(fits, key=lambda row: row["val_map"])["kept"] = "yes (best validation mAP)"
        rows += fits
        rows += [{"pooling": pooling, "C": c, "weighting": "balanced", **fit(features[pooling], labels, c, True)}
                 for c in weighted_strengths]
        print_table(rows, ["pooling", "C", "weighting", "val_map", "test_map", "seconds", "kept"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="the emoji task's labels.csv")
    parser.add_argument("--fashion-shots", type=int, nargs="*", default=[], help="K-shot Fashion-MNIST tasks to sweep")
    parser.add_argument("--cache", type=Path, default=None, help="feature cache folder (default: graft's)")
    parser.add_argument("--weighted-strengths", type=float, nargs="*", default=[0.03, 1.0],
                        help="the emoji strengths also fitted with balanced positive weighting")
    args = parser.parse_args()
    torch.set_num_threads(2)
    cache = args.cache or default_cache_dir()
    if args.data is not None:
        write_results("emoji_head_strength", emoji_rows(args.data, cache, args.weighted_strengths))
    if args.fashion_shots:
        rows = [row for shots in args.fashion_shots for row in fashion_rows(shots, cache)]
        print_table(rows, ["task", "pooling", "C", "val_accuracy", "test_accuracy"])
        write_results("fashion_head_strength", rows)


if __name__ == "__main__":
    main()
