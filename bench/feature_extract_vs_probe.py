"""20-shot Fashion-MNIST: graft `feature-extract` beside scikit-learn's linear probe.

Both use the same frozen EfficientNet-Lite0 features (graft's cache); the probe is
`LogisticRegression(max_iter=1000)` on them. Accuracy is reported on the held-out test split
(100 per class, never used for any choice); validation (100 per class) is what graft early-stops on.

    python bench/feature_extract_vs_probe.py [--shots 20] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, Timer, max_rss_mb, print_table, task_folder, write_results  # noqa: E402

import graft  # noqa: E402
from graft.input.data import load_labelled_folder  # noqa: E402
from graft.models.backbones import load_backbone  # noqa: E402
from graft.training.features import FeatureCache, backbone_key, extract_features  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shots", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(2)
    from sklearn.linear_model import LogisticRegression

    rows = []
    cache_root = Path(tempfile.mkdtemp(prefix="graft-bench-cache-"))
    backbone = load_backbone()
    cache = FeatureCache(cache_root, backbone_key(backbone, backbone.preprocessing, "fp32"))
    for seed in args.seeds:
        root = task_folder(args.shots, seed)
        splits = {name: load_labelled_folder(root / name)[0] for name in ("train", "valid", "test")}
        with Timer() as extraction:
            features = {name: extract_features(backbone, s.paths, s.digests, cache=cache) for name, s in splits.items()}
        with Timer() as fit:
            probe = LogisticRegression(max_iter=1000).fit(features["train"].numpy(), splits["train"].labels)
        rows.append({
            "method": "sklearn LogisticRegression (probe)", "seed": seed,
            "val_accuracy": probe.score(features["valid"].numpy(), splits["valid"].labels),
            "test_accuracy": probe.score(features["test"].numpy(), splits["test"].labels),
            "seconds": fit.seconds, "extraction_seconds": extraction.seconds,
        })
        with Timer() as run_timer:
            run = graft.train(root, out=RESULTS / "runs" / f"fe-{args.shots}-{seed}", strategy="feature-extract", seed=seed, cache_dir=str(cache_root), verbose=False)
        test = graft.evaluate(run.bundle_dir, root / "test")
        rows.append({
            "method": "graft feature-extract", "seed": seed,
            "val_accuracy": run.metrics["accuracy"], "test_accuracy": test["accuracy"],
            "seconds": run_timer.seconds, "extraction_seconds": None,
        })
        print_table(rows[-2:], ["method", "seed", "val_accuracy", "test_accuracy", "seconds"])
    summary = []
    for method in sorted({r["method"] for r in rows}):
        test = [r["test_accuracy"] for r in rows if r["method"] == method]
        summary.append({"method": method, "seeds": len(test), "test_mean": float(np.mean(test)), "test_min": float(np.min(test)), "test_max": float(np.max(test))})
    print()
    print_table(summary, ["method", "seeds", "test_mean", "test_min", "test_max"])
    print(f"max RSS {max_rss_mb():.0f} MB; graft's time includes loading, checking 1 200 images and reading the cache")
    print("written", write_results(f"feature_extract_vs_probe_{args.shots}shot", rows, {"summary": summary}))


if __name__ == "__main__":
    main()
