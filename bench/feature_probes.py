"""How far does a linear probe on frozen features go on the K-shot task? Sizes, levels, backbones.

Issue 3's target (0.85 test accuracy at 20 images per class of Fashion-MNIST) asks more of the
bundled EfficientNet-Lite0 than its features seem to hold. This measures the linear probe of
shared/benchmarks.md (scikit-learn `LogisticRegression`, default C, whole frame) on what could
carry more: other input sizes, the pooled outputs of earlier levels (timm's `feature_info`
stages) beside the final features, and the larger bundled backbones (Lite1 at 240 px, Lite2 at
260 px). Level combinations have each level centred and divided by one scale (the root of its
mean feature variance on the training images) and C chosen on validation from 0.1, 0.3, 1;
never on test. One extraction per backbone and size, shared by the seeds (bf16, 2 threads).

    python bench/feature_probes.py [--shots 20] [--seeds 0 1 2] [--sizes 160 224 288 320]
        [--backbones efficientnet_lite0 efficientnet_lite1 efficientnet_lite2]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import max_rss_mb, print_table, task_folder, write_results  # noqa: E402

from graft.choices import DEFAULT_BACKBONE  # noqa: E402
from graft.input.data import load_labelled_folder  # noqa: E402
from graft.models.backbones import load_backbone, with_crop  # noqa: E402
from graft.training.features import extract_features  # noqa: E402

SPLITS = ("train", "valid", "test")


class PooledLevels(nn.Module):
    """A normalised batch → every `feature_info` level's output, averaged over space, then the
    model's own pooled features (its last `num_features` columns)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        final, levels = self.model.forward_intermediates(images)
        return torch.cat([level.mean((2, 3)) for level in levels] + [self.model.forward_head(final)], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shots", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sizes", type=int, nargs="*", default=[160, 224, 288, 320], help="input sizes for the default backbone")
    parser.add_argument("--backbones", nargs="*", default=["efficientnet_lite1", "efficientnet_lite2"], help="others, at their own size")
    args = parser.parse_args()
    torch.set_num_threads(2)
    tasks = {seed: {name: load_labelled_folder(task_folder(args.shots, seed) / name)[0] for name in SPLITS} for seed in args.seeds}
    own = with_crop(load_backbone(DEFAULT_BACKBONE), 1.0)
    views = [(DEFAULT_BACKBONE, size) for size in args.sizes]
    views += [(name, None) for name in args.backbones if name != DEFAULT_BACKBONE]
    rows = []
    for name, size in views:
        backbone = own if name == DEFAULT_BACKBONE else with_crop(load_backbone(name), 1.0)
        if size is not None:
            backbone = dataclasses.replace(backbone, preprocessing=dataclasses.replace(backbone.preprocessing, input_size=(3, size, size)))
        size = backbone.preprocessing.input_size[-1]
        widths = [info["num_chs"] for info in backbone.model.feature_info] + [backbone.num_features]
        features, seconds = _features(backbone, tasks)
        variants = {"final features": [len(widths) - 1]}
        if name == DEFAULT_BACKBONE and size == own.preprocessing.input_size[-1]:
            variants["last two levels + final"] = [len(widths) - 3, len(widths) - 2, len(widths) - 1]
            variants["every level + final"] = list(range(len(widths)))
        for variant, blocks in variants.items():
            row = {"backbone": name, "size": size, "features": variant, "extraction_s": round(seconds, 1)}
            tests = []
            for seed, splits in tasks.items():
                val, test, c = _probe(features, splits, widths, blocks)
                row[f"seed{seed}"] = f"{val:.3f} / {test:.3f}" + (f" (C {c:g})" if c is not None else "")
                tests.append(test)
            row["mean_test"] = statistics.mean(tests)
            rows.append(row)
            print_table([row], list(row))
    print()
    columns = ["backbone", "size", "features"] + [f"seed{s}" for s in args.seeds] + ["mean_test", "extraction_s"]
    print_table(rows, columns)
    print(f"cells: validation / test accuracy; max RSS {max_rss_mb():.0f} MB")
    print("written", write_results(f"feature_probes_{args.shots}shot", rows, {"seeds": args.seeds, "max_rss_mb": max_rss_mb()}))


def _features(backbone, tasks) -> tuple[dict[str, np.ndarray], float]:
    """Pooled level features per image digest, each image once across the seeds' splits."""
    paths: dict[str, Path] = {}
    for splits in tasks.values():
        for split in splits.values():
            for path, digest in zip(split.paths, split.digests):
                paths.setdefault(digest, path)
    digests = list(paths)
    started = time.perf_counter()
    values = extract_features(backbone, [paths[d] for d in digests], digests, cache=None, precision="bf16",
                              model=PooledLevels(backbone.model))
    return dict(zip(digests, values.numpy())), time.perf_counter() - started


def _probe(features, splits, widths: list[int], blocks: list[int]) -> tuple[float, float, float | None]:
    """Validation and test accuracy of the probe on the chosen levels (and the C validation chose)."""
    from sklearn.linear_model import LogisticRegression

    edges = np.cumsum([0] + widths)
    data = {name: np.stack([features[d] for d in split.digests]) for name, split in splits.items()}
    labels = {name: np.asarray(split.labels) for name, split in splits.items()}
    if blocks == [len(widths) - 1]:  # the reference probe, as shared/benchmarks.md runs it
        columns = {name: values[:, edges[-2]:] for name, values in data.items()}
        probe = LogisticRegression(max_iter=1000).fit(columns["train"], labels["train"])
        return probe.score(columns["valid"], labels["valid"]), probe.score(columns["test"], labels["test"]), None
    scaled = {name: [] for name in data}
    for block in blocks:
        train = data["train"][:, edges[block]:edges[block + 1]]
        mean, scale = train.mean(0), np.sqrt(train.var(0).mean()) + 1e-8
        for name, values in data.items():
            scaled[name].append((values[:, edges[block]:edges[block + 1]] - mean) / scale)
    columns = {name: np.concatenate(parts, 1) for name, parts in scaled.items()}
    fitted = [(LogisticRegression(max_iter=2000, C=c).fit(columns["train"], labels["train"]), c) for c in (0.1, 0.3, 1.0)]
    probe, c = max(fitted, key=lambda pair: pair[0].score(columns["valid"], labels["valid"]))
    return probe.score(columns["valid"], labels["valid"]), probe.score(columns["test"], labels["test"]), c


if __name__ == "__main__":
    main()
