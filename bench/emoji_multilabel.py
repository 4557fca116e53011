"""The emoji multi-label task, and graft's multi-label training measured on it.

Images: npm `emoji-datasource-apple` 16.0.0 (64 px PNGs), every emoji with its skin-tone
variants; labels: the English CLDR keywords (`default`) of npm `cldr-annotations-full` 48.2.0
(`annotations/en/annotations.json`) and, for the sequences it does not list (skin tones, people
with professions, couples, flags), of `cldr-annotations-derived-full` 48.2.0
(`annotationsDerived/en/annotations.json`), joined through the code points of `emoji.json`.
Keywords used by at least 30 emoji (skin-tone variants counted once) are the labels; an image with none of them stays in, with no
label. The split is by emoji, not by image: an emoji and its skin-tone variants (near copies of one
drawing) fall on the same side, and so do emoji drawn with identical files (some flags, some families). 20 % of the emoji are held out as `test` and 20 % of the rest are
`valid`, each by a seeded iterative stratification over the emoji's label sets (the `split` column).

    cd /tmp && npm pack emoji-datasource-apple@16.0.0 cldr-annotations-full@48.2.0 cldr-annotations-derived-full@48.2.0
    python bench/emoji_multilabel.py build --packs /tmp --out /tmp/emoji-task
    python bench/emoji_multilabel.py measure --data /tmp/emoji-task/labels.csv

`measure` trains graft's default (`auto`), `feature-extract` and one fine-tuning strategy
(`partial`) on the CSV, and on the frozen features `feature-extract` cached it scores
scikit-learn's one-vs-rest `LogisticRegression` (default C) and graft's L-BFGS head with C chosen
on validation; each on the held-out test rows by macro mAP, with wall times. Rows merge into
`bench/results/emoji_multilabel.json` by method (`--strategies partial` alone adds its row).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, print_table, write_results  # noqa: E402

MIN_EMOJI_PER_KEYWORD = 30
TEST_FRACTION = 0.2


def _extract(pack: Path, member_prefix: str, into: Path) -> Path:
    """The members of an npm tarball under `member_prefix`, extracted once into `into`."""
    marker = into / ".extracted"
    if not marker.exists():
        with tarfile.open(pack) as archive:
            archive.extractall(into, members=[m for m in archive.getmembers() if m.name.startswith(member_prefix)], filter="data")
        marker.touch()
    return into / "package"


def emoji_keywords(packs: Path, work: Path) -> list[tuple[Path, str, list[str]]]:
    """(PNG, base emoji's code points, CLDR keywords) of every Apple emoji image, skin-tone variants
    included, whose character CLDR annotates."""
    images = _extract(packs / "emoji-datasource-apple-16.0.0.tgz", "package/", work / "apple")
    cldr = _extract(packs / "cldr-annotations-full-48.2.0.tgz", "package/annotations/en/", work / "cldr")
    derived = _extract(packs / "cldr-annotations-derived-full-48.2.0.tgz", "package/annotationsDerived/en/", work / "cldr-derived")
    annotations = {
        **json.loads((derived / "annotationsDerived/en/annotations.json").read_text())["annotationsDerived"]["annotations"],
        **json.loads((cldr / "annotations/en/annotations.json").read_text())["annotations"]["annotations"],
    }
    found = []
    for entry in json.loads((images / "emoji.json").read_text()):
        for variant in [entry, *(entry.get("skin_variations") or {}).values()]:
            png = images / "img/apple/64" / variant["image"]
            if not variant.get("has_img_apple") or not png.is_file():
                continue
            character = "".join(chr(int(code, 16)) for code in variant["unified"].split("-"))
            keywords = annotations.get(character) or annotations.get(character.replace("\ufe0f", ""))
            if keywords:
                found.append((png, entry["unified"], list(keywords["default"])))
    return found


def _grouped_split(groups: list[str], targets: np.ndarray, fraction: float, seed: int) -> set[str]:
    """The groups (base emoji) drawn as `fraction` of them by iterative stratification over each
    group's label set (the union of its images' labels)."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    names = sorted(set(groups))
    union = np.zeros((len(names), targets.shape[1]), dtype=np.int64)
    index = {name: row for row, name in enumerate(names)}
    for group, target in zip(groups, targets):
        union[index[group]] |= target
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    _, chosen = next(splitter.split(np.zeros(len(names)), union))
    return {names[i] for i in chosen}


def _same_picture_groups(pngs: list[Path], groups: list[str]) -> list[str]:
    """`groups` (each image's base emoji) merged wherever two emoji share an identical file: Apple
    draws some flags alike (Norway and Bouvet Island) and some families alike, and `graft check`
    finds such copies across a split as leaks. Each image's group becomes its merged group's first name."""
    parent = {group: group for group in groups}

    def root(group: str) -> str:
        while parent[group] != group:
            group = parent[group]
        return group

    first_group: dict[str, str] = {}
    for png, group in zip(pngs, groups):
        digest = hashlib.sha256(png.read_bytes()).hexdigest()
        other = first_group.setdefault(digest, group)
        a, b = sorted((root(group), root(other)))
        parent[b] = a
    return [root(group) for group in groups]


def build(packs: Path, out: Path, seed: int = 0) -> Path:
    """Write `out/images/*.png` and `out/labels.csv` (path,labels,split); returns the CSV."""
    found = emoji_keywords(packs, out / "npm")
    uses = Counter(k for _, k in {(group, k) for _, group, keywords in found for k in keywords})  # emoji, not images
    kept = sorted(k for k, n in uses.items() if n >= MIN_EMOJI_PER_KEYWORD)
    targets = np.array([[k in keywords for k in kept] for _, _, keywords in found], dtype=np.int64)
    groups = _same_picture_groups([png for png, _, _ in found], [group for _, group, _ in found])
    test = _grouped_split(groups, targets, TEST_FRACTION, seed)
    rest = [row for row, group in enumerate(groups) if group not in test]
    valid = _grouped_split([groups[r] for r in rest], targets[rest], TEST_FRACTION, seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    csv_path = out / "labels.csv"
    sides = Counter()
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "labels", "split"])
        for (png, _, keywords), group in zip(found, groups):
            side = "test" if group in test else "valid" if group in valid else "train"
            sides[side] += 1
            shutil.copyfile(png, out / "images" / png.name)
            writer.writerow([f"images/{png.name}", ";".join(k for k in kept if k in keywords), "" if side == "train" else side])
    print(f"{len(found)} emoji images ({len(set(groups))} emoji), {len(kept)} keywords used by >= {MIN_EMOJI_PER_KEYWORD} emoji, "
          f"{sides['train']} train / {sides['valid']} valid / {sides['test']} test images, "
          f"{int((targets.sum(1) == 0).sum())} with no kept keyword -> {csv_path}")
    return csv_path


def _probes(run_dir: Path, csv_path: Path) -> list[dict]:
    """The reference probes on the features graft cached for its run (the same frozen backbone,
    view and average pooling, the same training images), scored by test macro mAP:
    scikit-learn's one-vs-rest `LogisticRegression` (default C), and graft's L-BFGS head on the
    same features with C chosen on validation, which shows what the choice of C alone is worth."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from torch import nn

    from graft.input.multilabel import load_multilabel_dataset
    from graft.models.backbones import load_backbone, with_crop
    from graft.strategies.feature_extract import solve_logistic_regression
    from graft.training.features import FeatureCache, backbone_key, default_cache_dir, extract_features
    from graft.training.metrics import macro_average_precision
    from graft.training.multilabel import MULTILABEL

    config = json.loads((run_dir / "config.json").read_text())
    dataset = load_multilabel_dataset(csv_path, seed=config["seed"], val_fraction=config["val_fraction"])
    backbone = load_backbone(config["backbone"])
    backbone = with_crop(backbone, config["crop_pct"]) if config.get("crop_pct") else backbone
    precision = config["resolved"]["precision"]
    root = Path(config["cache_dir"]) if config.get("cache_dir") else default_cache_dir()
    cache = FeatureCache(root, backbone_key(backbone, backbone.preprocessing, precision))
    features = {part: extract_features(backbone, images.paths, images.digests, cache=cache, precision=precision)
                for part, images in (("train", dataset.train), ("valid", dataset.val), ("test", dataset.test))}
    labels = {part: np.asarray(images.labels) for part, images in (("train", dataset.train), ("valid", dataset.val), ("test", dataset.test))}
    started = time.perf_counter()
    probe = OneVsRestClassifier(LogisticRegression(max_iter=2000)).fit(features["train"].numpy(), labels["train"])
    sk_seconds = time.perf_counter() - started
    rows = [{"method": "scikit-learn one-vs-rest LogisticRegression (same features)", "chosen": "C 1",
             "test_map": round(macro_average_precision(labels["test"], probe.predict_proba(features["test"].numpy())), 4),
             "seconds": round(sk_seconds, 1)}]
    started, fits = time.perf_counter(), {}
    for c in MULTILABEL.l2_strengths:
        head = nn.Linear(features["train"].shape[1], labels["train"].shape[1])
        solve_logistic_regression(head, features["train"], torch.as_tensor(labels["train"]), c=c)
        with torch.no_grad():
            fits[c] = (macro_average_precision(labels["valid"], head(features["valid"]).numpy()), head(features["test"]).numpy())
    c = max(fits, key=lambda k: fits[k][0])
    rows.append({"method": "graft L-BFGS head on the same features, C chosen on validation", "chosen": f"C {c:g}",
                 "test_map": round(macro_average_precision(labels["test"], fits[c][1]), 4), "val_map": round(fits[c][0], 4),
                 "seconds": round(time.perf_counter() - started, 1)})
    return rows


def measure(csv_path: Path, out: Path, strategies: list[str], cache_root: Path | None = None) -> None:
    """Each of `strategies` trained by graft ("default" is `graft train` with no strategy named),
    and the probes on the frozen average-pooled features (`_probes`), on the test rows. Rows are
    merged into the results file by method, so strategies can be measured in separate runs. With
    `cache_root`, each strategy starts from an empty feature cache of its own (`cache_root/NAME`),
    so that its time is a first run's."""
    import graft

    results = RESULTS / "emoji_multilabel.json"
    kept = {row["method"]: row for row in json.loads(results.read_text())["rows"]} if results.exists() else {}
    rows = []
    for strategy in strategies:
        options = {} if strategy == "default" else {"strategy": strategy}
        if cache_root is not None:
            shutil.rmtree(cache_root / strategy, ignore_errors=True)
            options["cache_dir"] = str(cache_root / strategy)
        started = time.perf_counter()
        run = graft.train(csv_path, out=out / strategy, verbose=False, overwrite=True, **options)
        seconds = time.perf_counter() - started
        test = run.metrics["test"]
        chosen = (run.metrics.get("auto") or {}).get("kept") or run.metrics["strategy"]
        bundle = json.loads((run.bundle_dir / "graft.json").read_text())
        view = f"{bundle['backbone']['pooling']} pooling, crop {bundle['preprocessing']['crop_pct']:g}"
        rows.append({"method": f"graft {strategy}", "chosen": f"{chosen} ({view})",
                     "test_map": round(test["map"], 4), "test_micro_f1": round(test["micro_f1"], 4),
                     "val_map": round(run.metrics["map"], 4), "seconds": round(seconds, 1)})
        if strategy == "feature-extract":
            rows.extend(_probes(run.run_dir, csv_path))
        print_table(rows, ["method", "chosen", "test_map", "test_micro_f1", "val_map", "seconds"])
    kept.update({row["method"]: row for row in rows})
    write_results("emoji_multilabel", list(kept.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("--packs", type=Path, default=Path("/tmp"))
    b.add_argument("--out", type=Path, default=Path("/tmp/emoji-task"))
    m = sub.add_parser("measure")
    m.add_argument("--data", type=Path, default=Path("/tmp/emoji-task/labels.csv"))
    m.add_argument("--out", type=Path, default=Path("/tmp/emoji-runs"))
    m.add_argument("--strategies", nargs="+", default=["default", "feature-extract", "partial"],
                   help="graft strategies to train ('default': no strategy named); feature-extract adds the probes")
    m.add_argument("--cache-root", type=Path, default=None,
                   help="give each strategy an empty feature cache under this folder (first-run times)")
    args = parser.parse_args()
    if args.command == "build":
        build(args.packs, args.out)
    else:
        measure(args.data, args.out, args.strategies, args.cache_root)


if __name__ == "__main__":
    main()
