"""`graft demo` end to end in a subprocess (wall time, max RSS), and the fast path's accuracy.

1. `graft demo --out <tmp>` as a user runs it (data written, trained, evaluated, predicted), with
   the default precision ("auto": bf16 or fp32 on a CPU with native bf16, whichever ran the
   backbone faster; graft.speed.cpu_precision). Goal: <= 120 s on 2 cores.
2. The 20-shot Fashion-MNIST task (seed 0) with `feature-extract`, the best strategy of the
   benchmark table, once with `--precision fp32` and once with the fast path ("auto"), each with a
   fresh cache: validation (1 000, used for early stopping) and test (1 000, used for nothing
   else) accuracy, and the wall-time ratio.

    python bench/demo_time.py [--skip-accuracy]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, task_folder, write_results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="graft-demo-bench-") as scratch:
        started = time.perf_counter()
        subprocess.run(["graft", "demo", "--out", str(Path(scratch) / "demo")], check=True, capture_output=True)
        seconds = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    rows.append({"what": "graft demo (subprocess, default precision)", "seconds": seconds, "max_rss_mb": rss})
    print_table(rows, ["what", "seconds", "max_rss_mb"])
    accuracy = []
    if not args.skip_accuracy:
        import torch

        import graft

        torch.set_num_threads(2)
        root = task_folder(20)
        for precision in ("fp32", "auto"):
            with tempfile.TemporaryDirectory(prefix="graft-acc-") as scratch:
                started = time.perf_counter()
                run = graft.train(root, out=Path(scratch) / "run", strategy="feature-extract", cache_dir=str(Path(scratch) / "cache"), precision=precision, verbose=False)
                seconds = time.perf_counter() - started
                test = graft.evaluate(run.bundle_dir, root / "test")
                resolved = graft.load_bundle(run.bundle_dir).meta.get("precision")
            accuracy.append({"precision": f"{precision} ({resolved})", "val_accuracy": run.metrics["accuracy"],
                             "test_accuracy": test["accuracy"], "train_seconds": seconds})
        for row in accuracy:
            row["time_vs_fp32"] = row["train_seconds"] / accuracy[0]["train_seconds"]
        print()
        print_table(accuracy, ["precision", "val_accuracy", "test_accuracy", "train_seconds", "time_vs_fp32"])
    print("written", write_results("demo_time", rows, {"fast_path_accuracy": accuracy}))


if __name__ == "__main__":
    main()
