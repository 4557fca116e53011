"""Shared helpers of the benchmarks: the few-shot task, timing, max RSS, the results table."""

from __future__ import annotations

import json
import platform
import resource
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def task_folder(shots: int, seed: int = 0) -> Path:
    """The K-shot Fashion-MNIST task of shared/benchmarks.md (train/valid/test folders)."""
    from graft.input.sample_data import few_shot_fashion_mnist

    return few_shot_fashion_mnist(RESULTS / "data" / f"fashion-{shots}shot-seed{seed}", shots, seed=seed)


def training_batch(count: int = 32) -> tuple[list[Path], list[str], torch.Tensor]:
    """The first `count` training images of the 20-shot task (seed 0): paths, digests, labels."""
    from graft.input.data import load_labelled_folder

    split = load_labelled_folder(task_folder(20) / "train")[0]
    return split.paths[:count], split.digests[:count], torch.tensor(split.labels[:count])


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict[str, object]:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}


def write_results(name: str, rows: list[dict], extra: dict | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), "rows": rows, **(extra or {})}, indent=2))
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(_fmt(row.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)


class Timer:
    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
