"""`graft check` against planted faults in real folders: flipped labels and near-duplicate leaks.

    python bench/check.py                      # Fashion-MNIST and the Debian clip art
    python bench/check.py --sets fashion       # Fashion-MNIST only
    python bench/check.py --seed 1             # other flips, split and plantings (the duplicate rule's thresholds were chosen on seed 1)

Labels: 100 images per class (Fashion-MNIST's training images; the clip art's 15 largest
categories of `openclipart-png`, at most 100 each, links skipped), 5 % of them moved to another
class at random (--seed, 0 by default); precision and recall of the images `graft check` flags as `label`
against the moved ones. Duplicates: the same folders split 80/20 into train/ and valid/; the
clean folder's `leak` and `duplicate` rows are false positives; then 20 training images are
planted in valid/ (each cropped by 5 %, resized to 80 %, re-encoded as JPEG at quality 70):
found = planted copies named by a `leak` row. Clip art: `apt-get download openclipart-png`,
`dpkg-deb -x` it, and pass the folder that holds `usr/` with --clipart (default /tmp/check-clipart/root).
Writes bench/results/check.json (check-seedN.json for --seed N).
"""

from __future__ import annotations

import argparse
import io
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import graft  # noqa: E402
from common import machine, print_table, write_results  # noqa: E402
from graft.input.images import load_image  # noqa: E402
from graft.input.sample_data import load_fashion_mnist, sample_per_class, write_image_folder  # noqa: E402

FLIP_SHARE = 0.05
PLANTED = 20
CLIPART_CATEGORIES = 15
PER_CLASS = 100


def fashion_source(work: Path) -> Path:
    root = work / "fashion-source"
    if not root.is_dir():
        source = load_fashion_mnist("train")
        write_image_folder(source, sample_per_class(source.labels, PER_CLASS, np.random.default_rng(0)), root)
    return root


def clipart_source(work: Path, extracted: Path) -> Path:
    """The 15 categories with most regular PNG files, at most 100 each (seeded), copied flat."""
    root = work / "clipart-source"
    if root.is_dir():
        return root
    base = extracted / "usr/share/openclipart/png"
    if not base.is_dir():
        raise SystemExit(f"{base}: not found; apt-get download openclipart-png && dpkg-deb -x openclipart-png_*.deb {extracted}")
    folders = {d: sorted(p for p in d.glob("*.png") if p.is_file() and not p.is_symlink()) for d in base.glob("*/*") if d.is_dir()}
    largest = sorted(folders, key=lambda d: (-len(folders[d]), str(d)))[:CLIPART_CATEGORIES]
    rng = random.Random(0)
    for folder in largest:
        files = folders[folder]
        chosen = sorted(rng.sample(files, min(PER_CLASS, len(files))))
        target = root / f"{folder.parent.name}-{folder.name}"
        target.mkdir(parents=True)
        for path in chosen:
            shutil.copy(path, target / path.name)
    return root


def flipped_copy(source: Path, target: Path, seed: int = 0) -> set[str]:
    """`source` copied with 5 % of its images moved to another class; returns their new paths."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    classes = sorted(d.name for d in target.iterdir() if d.is_dir())
    files = sorted(p for p in target.glob("*/*") if p.is_file())
    rng = random.Random(seed)
    moved = set()
    for path in rng.sample(files, round(FLIP_SHARE * len(files))):
        other = rng.choice([c for c in classes if c != path.parent.name])
        destination = target / other / path.name
        path.rename(destination)
        moved.add(f"{other}/{path.name}")
    return moved


def label_row(name: str, source: Path, work: Path, seed: int) -> dict:
    root = work / f"{name}-flipped"
    moved = flipped_copy(source, root, seed)
    started = time.perf_counter()
    result = graft.check(root, verbose=False)
    flagged = {f.path for f in result.findings if f.issue == "label"}
    hits = len(flagged & moved)
    return {
        "set": name, "seed": seed, "images": result.images, "flipped": len(moved), "flagged": len(flagged),
        "precision": round(hits / max(len(flagged), 1), 3), "recall": round(hits / len(moved), 3),
        "check_seconds": round(time.perf_counter() - started, 1),
    }


def split_copy(source: Path, target: Path, seed: int = 0) -> list[Path]:
    """`source` split 80/20 into target/train and target/valid (seeded); returns the training files."""
    if target.exists():
        shutil.rmtree(target)
    rng = random.Random(seed)
    train = []
    for folder in sorted(d for d in source.iterdir() if d.is_dir()):
        files = sorted(folder.iterdir())
        rng.shuffle(files)
        cut = round(0.2 * len(files))
        for part, chosen in (("valid", files[:cut]), ("train", files[cut:])):
            (target / part / folder.name).mkdir(parents=True)
            for path in chosen:
                shutil.copy(path, target / part / folder.name / path.name)
                if part == "train":
                    train.append(target / part / folder.name / path.name)
    return train


def near_copy(path: Path, rng: random.Random) -> bytes:
    """The picture cropped by 5 % (a random side share), resized to 80 %, saved as JPEG quality 70."""
    image = load_image(path)  # as graft sees it: transparency composited on white
    width, height = image.size
    dx, dy = round(0.05 * width), round(0.05 * height)
    left, top = rng.randint(0, dx), rng.randint(0, dy)
    image = image.crop((left, top, width - (dx - left), height - (dy - top)))
    image = image.resize((max(1, round(0.8 * image.width)), max(1, round(0.8 * image.height))), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=70)
    return buffer.getvalue()


def duplicate_row(name: str, source: Path, work: Path, seed: int) -> dict:
    root = work / f"{name}-split"
    train = split_copy(source, root, seed)
    clean = graft.check(root, verbose=False)
    false_positives = [f for f in clean.findings if f.issue in ("leak", "duplicate")]
    rng = random.Random(seed)
    planted = set()
    for path in rng.sample(train, PLANTED):
        copy = root / "valid" / path.parent.name / f"planted-{path.stem}.jpg"
        copy.write_bytes(near_copy(path, rng))
        planted.add(f"valid/{path.parent.name}/{copy.name}")
    result = graft.check(root, verbose=False)
    named = {f.path for f in result.findings if f.issue == "leak"}
    return {
        "set": name, "seed": seed, "images": clean.images, "planted": PLANTED, "found": len(planted & named),
        "clean_false_positives": len(false_positives), "missed": sorted(planted - named),
        "clean_findings": [f"{f.path}: {f.detail}" for f in false_positives],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="fashion,clipart")
    parser.add_argument("--work", type=Path, default=Path("/tmp/check-bench"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the flips, the split and the plantings")
    parser.add_argument("--clipart", type=Path, default=Path("/tmp/check-clipart/root"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    sources = {"fashion": lambda: fashion_source(args.work), "clipart": lambda: clipart_source(args.work, args.clipart)}
    labels, duplicates = [], []
    for name in args.sets.split(","):
        source = sources[name]()
        labels.append(label_row(name, source, args.work, args.seed))
        print_table(labels[-1:], ["set", "seed", "images", "flipped", "flagged", "precision", "recall", "check_seconds"])
        duplicates.append(duplicate_row(name, source, args.work, args.seed))
        print_table(duplicates[-1:], ["set", "seed", "images", "planted", "found", "clean_false_positives"])
    print_table(labels, ["set", "seed", "images", "flipped", "flagged", "precision", "recall", "check_seconds"])
    print_table(duplicates, ["set", "seed", "images", "planted", "found", "clean_false_positives"])
    for row in duplicates:
        for example in row["clean_findings"]:
            print(f"  {row['set']} clean folder: {example}")
        for path in row["missed"]:
            print(f"  {row['set']} planted copy not found: {path}")
    write_results("check" if args.seed == 0 else f"check-seed{args.seed}", labels + duplicates, {"machine": machine(), "seed": args.seed})


if __name__ == "__main__":
    main()
