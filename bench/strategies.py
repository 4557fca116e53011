"""Every strategy beside the peers on the K-shot Fashion-MNIST task (shared/benchmarks.md).

Accuracy is on the held-out test split (never used for a choice); graft may use validation for
early stopping and for `auto`. Each row is one run: wall time from the call to graft.train (or the
peer's training loop) to its end, trainable parameters, and validation/test accuracy.

    python bench/strategies.py --shots 20 [--strategies auto feature-extract partial ...] [--peers probe probe-whole-frame probe-grid probe-grid-2 probe-grid-3 textbook-frozen textbook-full fastai]
    [--set crop_pct=1.0] [--set-for lp-ft:augment=strong]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, max_rss_mb, print_table, task_folder, write_results  # noqa: E402

import graft  # noqa: E402

ALL_STRATEGIES = ["feature-extract", "partial", "lp-ft", "gradual", "discriminative", "full", "lora", "auto"]
ALL_PEERS = ["probe", "probe-whole-frame", "probe-grid", "probe-grid-2", "probe-grid-3", "textbook-frozen", "textbook-full", "fastai"]
COLUMNS = ["method", "test_accuracy", "val_accuracy", "seconds", "trainable_params", "note"]


def run_graft(root: Path, strategy: str, epochs: int | None, cache: Path, options: dict) -> dict:
    """One graft run; `strategy="default"` calls graft.train with no strategy (what a user gets)."""
    started = time.perf_counter()
    options = {"epochs": epochs, **options}  # an --set epochs=N wins over --epochs
    if strategy != "default":
        options["strategy"] = strategy
    suffix = "-".join(str(options[k]) for k in ("pooling", "crop_pct") if options.get(k) is not None)
    run = graft.train(root, out=RESULTS / "runs" / f"{root.name}-{strategy}{'-' + suffix if suffix else ''}",
                      cache_dir=str(cache), verbose=False, overwrite=True, **options)
    seconds = time.perf_counter() - started
    test = graft.evaluate(run.bundle_dir, root / "test")
    auto = run.metrics.get("auto", {})
    note = f"rule chose {auto['chose']}, kept {auto.get('kept', auto['chose'])} ({auto.get('settings', {}).get('pooling', '?')} pooling)" if auto else ""
    return {"method": f"graft {strategy}", "test_accuracy": test["accuracy"], "val_accuracy": run.metrics["accuracy"],
            "seconds": seconds, "trainable_params": run.metrics["trainable_params"], "note": note,
            "epochs_run": run.metrics["epochs_run"]}


def run_probe(root: Path, cache: Path, crop_pct: float | None = None, pooling: str = "avg") -> dict:
    """The linear-probe peer of benchmarks.md: LogisticRegression on the frozen pooled features (fp32).

    `crop_pct=1.0` is the protocol's probe: its peers resize to 224 px with no crop, and this view
    reproduces its 0.796 validation accuracy on seed 0. `crop_pct=None` uses the backbone's own
    evaluation crop (0.875), the view graft starts from before auto measures the framing.
    `pooling="grid"` / `"grid-2"` / `"grid-3"`: the same probe on graft's grid features of the last
    one, two or three stages (`graft.models.pooling`), for comparison.
    """
    from sklearn.linear_model import LogisticRegression

    from graft.models.backbones import load_backbone, with_crop, with_pooling
    from graft.input.data import load_labelled_folder
    from graft.training.features import FeatureCache, backbone_key, extract_features

    backbone = with_pooling(load_backbone(), pooling)
    if crop_pct is not None:
        backbone = with_crop(backbone, crop_pct)
    store = FeatureCache(cache, backbone_key(backbone, backbone.preprocessing, "fp32"))
    started = time.perf_counter()
    sets = {name: load_labelled_folder(root / name)[0] for name in ("train", "valid", "test")}
    features = {name: extract_features(backbone, s.paths, s.digests, cache=store).numpy() for name, s in sets.items()}
    probe = LogisticRegression(max_iter=1000).fit(features["train"], sets["train"].labels)
    view = "backbone's crop" if crop_pct is None else ("whole frame, the protocol's" if crop_pct == 1.0 else f"crop {crop_pct:g}")
    if pooling != "avg":
        view = view.replace(", the protocol's", "") + f", {pooling} pooling"
    return {"method": f"sklearn probe (LogisticRegression, {view})", "test_accuracy": probe.score(features["test"], sets["test"].labels),
            "val_accuracy": probe.score(features["valid"], sets["valid"].labels), "seconds": time.perf_counter() - started,
            "trainable_params": probe.coef_.size + probe.intercept_.size, "note": "extraction of train+valid+test included"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shots", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="epochs for every graft strategy (default: each one's own)")
    parser.add_argument("--strategies", nargs="*", default=ALL_STRATEGIES, help="also `default`: graft.train with no strategy given")
    parser.add_argument("--shared-cache", action="store_true", help="one feature cache for every graft row (a later row reuses the features an earlier one computed; its seconds are then not its own)")
    parser.add_argument("--poolings", nargs="*", default=[None], help="feature-extract once per pooling given (avg grid grid-2 grid-3)")
    parser.add_argument("--peers", nargs="*", default=ALL_PEERS)
    parser.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE", help="extra graft options for every strategy, e.g. crop_pct=1.0")
    parser.add_argument("--set-for", nargs="*", default=[], metavar="STRATEGY:OPTION=VALUE", help="an option for one strategy, e.g. lp-ft:augment=strong")
    args = parser.parse_args()
    torch.set_num_threads(2)
    import peers

    root = task_folder(args.shots, args.seed)
    rows: list[dict] = []
    name = f"strategies_{args.shots}shot_seed{args.seed}" + ("_" + "_".join(args.set) if args.set else "") + ("_" + "_".join(args.strategies) if args.strategies != ALL_STRATEGIES else "") + ("_" + "_".join(args.poolings) if args.poolings != [None] else "")

    def record(row: dict | None, role: str) -> None:
        if row is None:
            return
        row.setdefault("method", role)
        row["role"] = role
        rows.append(row)
        print_table([row], COLUMNS)
        write_results(name, rows, {"shots": args.shots, "seed": args.seed, "max_rss_mb": max_rss_mb(), "acceptance": acceptance(rows)})

    shared = Path(tempfile.mkdtemp(prefix="graft-bench-")) if args.shared_cache else None
    runs = [(s, p) for s in args.strategies for p in (args.poolings if s == "feature-extract" else [None])]
    for strategy, pooling in runs:
        # A fresh cache per strategy: every row pays for its own backbone passes.
        own = [item.split(":", 1)[1] for item in args.set_for if item.split(":", 1)[0] == strategy]
        own += [f"pooling={pooling}"] if pooling is not None else []
        options = {"seed": args.seed, **{k: _value(v) for k, v in (item.split("=", 1) for item in args.set + own)}}
        measures = strategy in ("auto", "default")
        if measures:  # auto measures the framing itself; a given crop would skip that
            options.pop("crop_pct", None)
        row = run_graft(root, strategy, args.epochs, shared or Path(tempfile.mkdtemp(prefix="graft-bench-")), options)
        shown = args.set + own if not measures else [o for o in args.set if not o.startswith("crop_pct=")]
        if shown:
            row["method"] += " (" + ", ".join(shown) + ")"
        record(row, f"graft {strategy}" + (f" {pooling}" if pooling else ""))
    if "probe" in args.peers:
        record(run_probe(root, Path(tempfile.mkdtemp(prefix="graft-bench-"))), "probe")
    if "probe-whole-frame" in args.peers:
        record(run_probe(root, Path(tempfile.mkdtemp(prefix="graft-bench-")), crop_pct=1.0), "probe-whole-frame")
    for pooling in ("grid", "grid-2", "grid-3"):
        if f"probe-{pooling}" in args.peers:
            record(run_probe(root, Path(tempfile.mkdtemp(prefix="graft-bench-")), crop_pct=1.0, pooling=pooling), f"probe-{pooling}")
    if "textbook-frozen" in args.peers:
        record({"method": "textbook frozen loop, 5 epochs (BN in train mode)", **peers.textbook(root, full=False)}, "textbook-frozen")
    if "textbook-full" in args.peers:
        record({"method": "textbook full fine-tune, Adam 1e-4, 5 epochs", **peers.textbook(root, full=True)}, "textbook-full")
    if "fastai" in args.peers:
        record(_fastai_row(peers, root), "fastai")
    print()
    print_table(sorted(rows, key=lambda r: -r["test_accuracy"]), COLUMNS)
    for line, value in acceptance(rows).items():
        print(f"{line}: {value}")
    print(f"max RSS {max_rss_mb():.0f} MB; written {RESULTS / (name + '.json')}")


def acceptance(rows: list[dict]) -> dict[str, str]:
    """Issue 3's acceptance lines, from the rows this run has (test accuracy; a line whose rows
    were not run is left out)."""
    by_role = {row["role"]: row for row in rows}
    graft_rows = [row for row in rows if row["role"].startswith("graft ")]
    lines: dict[str, str] = {}
    if not graft_rows:
        return lines
    best = max(graft_rows, key=lambda row: row["test_accuracy"])
    lines["best strategy"] = f"{best['role']} {best['test_accuracy']:.3f} (target 0.85: {'reached' if best['test_accuracy'] >= 0.85 else 'not reached'})"
    for role, label, goal in (("probe-whole-frame", "the protocol's probe (whole frame)", "required: >= +2"),
                              ("probe", "the probe on the backbone's crop", "for comparison"),
                              ("probe-grid", "the probe on the 3x3 grid features", "for comparison"),
                              ("probe-grid-2", "the probe on the 3x3 grids of the last two stages", "for comparison"),
                              ("probe-grid-3", "the probe on the grids of the last three stages", "for comparison")):
        if role in by_role:
            margin = 100 * (best["test_accuracy"] - by_role[role]["test_accuracy"])
            lines[f"best - {label}"] = f"{margin:+.1f} points ({goal})"
    default = by_role.get("graft default")
    others = [row for row in graft_rows if row is not default]
    if default is not None and others:
        rival = max(others, key=lambda row: row["test_accuracy"])
        lines["default - best other"] = f"{100 * (default['test_accuracy'] - rival['test_accuracy']):+.1f} points against {rival['method']}"
    auto = by_role.get("graft auto")
    if auto is not None:
        lines["auto - best"] = f"{100 * (auto['test_accuracy'] - best['test_accuracy']):+.1f} points (required: within 1)"
        if "fastai" in by_role:
            lines["auto / fastai seconds"] = f"{auto['seconds'] / by_role['fastai']['seconds']:.2f} (required: < 0.5)"
    return lines


def _value(text: str) -> object:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _fastai_row(peers, root: Path) -> dict | None:
    result = peers.fastai(root)
    return None if result is None else {"method": "fastai fine_tune(4, freeze_epochs=1)", **result, "note": "time excludes the final validation"}


if __name__ == "__main__":
    main()
