"""`auto` on the 20-shot Fashion-MNIST task with and without the prefix tap, alternated in one run.

With the tap (graft's path), the frozen prefix's outputs for the plain view are kept from the full
passes that compute the pooled features (auto's framing, lp-ft's probe); without it (the tap
switched off here, in the bench only), the prefix runs over those images a second time. Each run
starts from an empty feature cache, as a user's first run does, after one untimed run that warms
the process up. Prints each repetition's wall time, its framing and prefix pass (timed from the
run's own messages), the medians, the ratio with ÷ without, and whether every run gives the same
bundle tensors bit for bit.

    python bench/prefix_tap.py [--shots 20] [--seed 0] [--repeats 3] [--crop-pct 1.0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import max_rss_mb, print_table, task_folder, write_results  # noqa: E402

import graft  # noqa: E402
from graft.strategies import auto, finetune  # noqa: E402


class _Clock:
    """Times between the run's messages: the framing (from the start to "auto framing: ...", when
    auto measures it) and the prefix pass (from the end of lp-ft's probe to "training ... on
    cached outputs of the frozen prefix")."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.marks: list[tuple[float, str]] = []

    def say(self, message: str) -> None:
        self.marks.append((time.perf_counter(), message))

    def framing_seconds(self) -> float | None:
        return next((t - self.start for t, m in self.marks if m.startswith("auto framing:")), None)

    def prefix_seconds(self) -> float:
        start = next(t for t, m in self.marks if m.startswith("lp-ft: linear probe done"))
        end = next(t for t, m in self.marks if m.startswith("training ") and "on cached outputs of the frozen prefix" in m)
        return end - start


def _tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    from safetensors.torch import load_file

    return {name: (str(t.dtype), t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
            for name, t in load_file(str(path)).items()}


def run_once(root: Path, scratch: Path, *, tapped: bool, crop_pct: float | None) -> dict:
    from graft import console

    original, say = auto.with_prefix_tap, console.Reporter.say
    if not tapped:
        auto.with_prefix_tap = finetune.with_prefix_tap = lambda context, name: context
    clock = _Clock()

    def recording(self, message: str, *args, **kwargs):
        clock.say(message)
        return say(self, message, *args, **kwargs)

    console.Reporter.say = recording
    try:
        options = {"crop_pct": crop_pct} if crop_pct is not None else {}
        clock.start = time.perf_counter()
        run = graft.train(root, out=scratch / "run", strategy="auto", cache_dir=str(scratch / "cache"), verbose=False, **options)
        seconds = time.perf_counter() - clock.start
    finally:
        auto.with_prefix_tap = finetune.with_prefix_tap = original
        console.Reporter.say = say
    bundle = _tensors(run.bundle_dir / "model.safetensors")
    return {"tap": "on (graft)" if tapped else "off", "seconds": seconds, "framing_seconds": clock.framing_seconds(),
            "prefix_pass_seconds": clock.prefix_seconds(),
            "prefix_outputs_kept": run.metrics.get("prefix_outputs_kept", 0), "prefix_computed": run.metrics.get("features_computed"),
            "val_accuracy": run.metrics["accuracy"], "chose": run.metrics["auto"]["chose"], "bundle": bundle}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shots", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--crop-pct", type=float, default=None, help="as bench/strategies.py's --set crop_pct (skips auto's framing)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = task_folder(args.shots, args.seed)
    with tempfile.TemporaryDirectory(prefix="graft-tap-") as scratch:
        run_once(root, Path(scratch), tapped=True, crop_pct=args.crop_pct)  # not timed: the process's first run pays 3-5 s of warm-up
    rows = []
    for repeat in range(args.repeats):
        for tapped in ((False, True) if repeat % 2 else (True, False)):  # alternate which goes first
            with tempfile.TemporaryDirectory(prefix="graft-tap-") as scratch:
                row = run_once(root, Path(scratch), tapped=tapped, crop_pct=args.crop_pct)
            rows.append({"repeat": repeat, **row})
            print(f"repeat {repeat}, tap {row['tap']}: {row['seconds']:.1f} s (framing {row['framing_seconds'] or 0:.1f} s, "
                  f"prefix pass {row['prefix_pass_seconds']:.1f} s)", flush=True)
    same = all(row["bundle"] == rows[0]["bundle"] for row in rows)  # names, dtypes and bits of every tensor
    for row in rows:
        del row["bundle"]
    print_table(rows, ["repeat", "tap", "seconds", "framing_seconds", "prefix_pass_seconds", "prefix_outputs_kept", "prefix_computed", "val_accuracy", "chose"])
    on = [r for r in rows if r["tap"] == "on (graft)"]
    off = [r for r in rows if r["tap"] == "off"]
    summary = {
        "auto_seconds_on": statistics.median(r["seconds"] for r in on),
        "auto_seconds_off": statistics.median(r["seconds"] for r in off),
        "prefix_pass_on": statistics.median(r["prefix_pass_seconds"] for r in on),
        "prefix_pass_off": statistics.median(r["prefix_pass_seconds"] for r in off),
        "per_repeat_ratio": [a["seconds"] / b["seconds"] for a in on for b in off if a["repeat"] == b["repeat"]],
        "same_bundle_bits": same, "max_rss_mb": max_rss_mb(),
    }
    summary["auto_ratio_on_over_off"] = summary["auto_seconds_on"] / summary["auto_seconds_off"]
    print(f"auto with the tap ÷ without: {summary['auto_ratio_on_over_off']:.3f} (per repetition "
          f"{', '.join(f'{r:.3f}' for r in summary['per_repeat_ratio'])}); prefix pass {summary['prefix_pass_on']:.1f} s "
          f"against {summary['prefix_pass_off']:.1f} s; same bundle bits: {same}; max RSS {summary['max_rss_mb']:.0f} MB")
    print("written", write_results("prefix_tap", rows, summary))


if __name__ == "__main__":
    main()
