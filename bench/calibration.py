"""Calibration on the K-shot Fashion-MNIST task (shared/benchmarks.md): ECE, NLL and Brier score on
the held-out TEST split, before (T = 1) and after the temperature graft fits on validation.

Each strategy trains once (graft.train, seed given); the test images go through the bundle once
for their logits, and the measures are taken on softmax(logits) and softmax(logits / T), T being
the bundle's. The test split chose nothing: the temperature is fitted on validation only.

Two diagnostics beside them, chosen by nothing: `test_ece_floor`, the mean ECE of 200 label sets
drawn from the calibrated test probabilities themselves (what a perfectly calibrated model with
these scores measures on this many images: the estimator's own bias), and `test_ece_best_t`, the
ECE with a temperature fitted on the test split (the best one scalar could do).

    python bench/calibration.py --shots 20 --seed 0 [--strategies feature-extract partial lp-ft] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, print_table, task_folder, write_results  # noqa: E402

import graft  # noqa: E402
from graft.input.data import load_labelled_folder  # noqa: E402
from graft.input.images import load_image  # noqa: E402
from graft.training.calibration import calibration_measures, fit_temperature  # noqa: E402

COLUMNS = ["strategy", "temperature", "test_accuracy", "test_ece_before", "test_ece_after", "test_ece_floor", "test_ece_best_t",
           "test_nll_before", "test_nll_after", "test_brier_before", "test_brier_after", "val_ece_before", "val_ece_after"]
GOAL_ECE = 0.03


def test_logits(bundle: graft.Bundle, folder: Path, batch_size: int = 64) -> tuple[torch.Tensor, list[int]]:
    """The bundle's raw logits for every image of a labelled folder, and the labels in the bundle's order."""
    images, _ = load_labelled_folder(folder)
    index = {name: i for i, name in enumerate(bundle.class_names)}
    labels = [index[images.class_names[y]] for y in images.labels]
    chunks = []
    for start in range(0, len(images.paths), batch_size):
        batch = [load_image(path, min_size=bundle.preprocessing.resize_size) for path in images.paths[start : start + batch_size]]
        chunks.append(bundle.logits(batch))
    return torch.cat(chunks), labels


def ece_floor(probabilities: torch.Tensor, draws: int = 200, seed: int = 0) -> float:
    """Mean ECE when the labels are drawn from `probabilities` (a perfectly calibrated model's ECE)."""
    generator = torch.Generator().manual_seed(seed)
    values = [calibration_measures(probabilities, torch.multinomial(probabilities, 1, generator=generator)[:, 0])["ece"] for _ in range(draws)]
    return sum(values) / draws


def run_strategy(root: Path, strategy: str, seed: int, reuse: bool) -> dict:
    out = RESULTS / "runs" / f"calibration-{root.name}-{strategy}"
    if reuse and (out / "metrics.json").is_file():  # analyse the run written by an earlier call
        metrics = json.loads((out / "metrics.json").read_text())
    else:
        metrics = graft.train(root, out=out, strategy=strategy, seed=seed, cache_dir=tempfile.mkdtemp(prefix="graft-bench-"),
                              verbose=False, overwrite=True).metrics
    bundle = graft.load_bundle(out / "bundle")
    logits, labels = test_logits(bundle, root / "test")
    before = calibration_measures(logits.softmax(dim=1), labels)
    calibrated = (logits / bundle.temperature).softmax(dim=1)
    after = calibration_measures(calibrated, labels)
    best_t = calibration_measures((logits / fit_temperature(logits, labels)).softmax(dim=1), labels)["ece"]
    validation = metrics["calibration"]
    return {
        "strategy": strategy,
        "temperature": bundle.temperature,
        "test_accuracy": float((logits.argmax(1) == torch.tensor(labels)).float().mean()),
        **{f"test_{key}_before": value for key, value in before.items()},
        **{f"test_{key}_after": value for key, value in after.items()},
        "test_ece_floor": ece_floor(calibrated),
        "test_ece_best_t": best_t,
        "val_ece_before": validation["before"]["ece"],
        "val_ece_after": validation["after"]["ece"],
        "num_test": len(labels),
        "num_val": metrics["num_val"],
        "train_seconds": metrics["train_seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shots", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategies", nargs="*", default=["feature-extract", "partial", "lp-ft"])
    parser.add_argument("--reuse", action="store_true", help="measure the runs an earlier call wrote instead of training again")
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = task_folder(args.shots, args.seed)
    name = f"calibration_{args.shots}shot_seed{args.seed}"
    rows: list[dict] = []
    for strategy in args.strategies:
        rows.append(run_strategy(root, strategy, args.seed, args.reuse))
        print_table(rows[-1:], COLUMNS)
        write_results(name, rows, {"shots": args.shots, "seed": args.seed, "goal_test_ece_after": GOAL_ECE})
    print()
    print_table(rows, COLUMNS)
    for row in rows:
        verdict = "reached" if row["test_ece_after"] <= GOAL_ECE else "not reached"
        print(f"{row['strategy']}: test ECE {row['test_ece_before']:.3f} -> {row['test_ece_after']:.3f} (goal <= {GOAL_ECE}: {verdict})")
    print(f"written {RESULTS / (name + '.json')}")


if __name__ == "__main__":
    main()
