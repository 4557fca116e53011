"""`graft compare`: several strategies on the same data, side by side, in one report.

Every strategy runs with the same `TrainConfig` except `strategy` and `out`: the same split and
seed, the same augmentation, the same epoch budget. Each runs in its own child process
(`graft.report.compare_worker`), so the peak memory (max RSS) measured is that strategy's alone.

    out/
      graft-manifest.json  what graft writes here (`graft.run_folder`)
      compare.json     one row per strategy: accuracy, macro-F1, wall time, peak memory, params
      compare.html     the table, the curves overlaid, forgetting per stage for each strategy
      STRATEGY/        each strategy's full run folder (with its own report.html)
      STRATEGY.log     the output of that strategy's training process

`out` follows the run folder's rules: a new or empty folder, or an earlier comparison replaced
only with `overwrite=True`; a folder holding anything else is refused untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from graft.atomic import write_json, write_text
from graft.config import TrainConfig
from graft.console import QUIET, Reporter
from graft.errors import ConfigError
from graft.report.parts import esc, fmt, img, note, page, section, table
from graft.run_folder import claim_folder
from graft.strategies import STRATEGY_NAMES

# Strategies differ in their default epochs; a comparison needs one budget for all of them.
DEFAULT_COMPARE_EPOCHS = 10


@dataclass
class CompareRow:
    """One strategy's result in a comparison (one row of compare.json)."""

    strategy: str
    val_accuracy: float | None
    macro_f1: float | None
    wall_seconds: float | None  # the child's train_with_config, report included
    train_seconds: float | None  # from metrics.json: data checks, backbone, training
    peak_rss_mb: float | None
    trainable_params: int | None
    total_params: int | None
    epochs_run: int | None
    run_dir: str
    error: str | None = None


@dataclass
class Comparison:
    rows: list[CompareRow]
    json_path: Path
    html_path: Path


def parse_strategies(spec: str | Sequence[str]) -> list[str]:
    """"a,b,c" or a list → checked, de-duplicated strategy names, in order."""

    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n for n in names if n]
    if len(names) < 2:
        raise ConfigError(f"give at least two strategies to compare, separated by commas (e.g. feature-extract,partial); got {names}", parameter="strategies")
    unknown = [n for n in names if n not in STRATEGY_NAMES]
    if unknown:
        raise ConfigError(f"{', '.join(map(repr, unknown))} not among the strategies ({', '.join(STRATEGY_NAMES)})", parameter="strategies")
    if len(set(names)) != len(names):
        raise ConfigError(f"{names} names a strategy twice; each runs once", parameter="strategies")
    return names


def compare(
    data: str | Path,
    strategies: str | Sequence[str],
    out: str | Path,
    *,
    reporter: Reporter = QUIET,
    overwrite: bool = False,
    **options: Any,
) -> Comparison:
    """Train each strategy on `data` with otherwise identical settings; write compare.json/.html.

    `options` are `TrainConfig` fields (`epochs`, `seed`, `augment`, `backbone`, ...); `epochs`
    defaults to `DEFAULT_COMPARE_EPOCHS` so that every strategy gets the same budget. A strategy
    that fails is recorded with its error (its log is `out/STRATEGY.log`); the others run.
    `overwrite=True` replaces an earlier comparison in `out` (its files are removed first).

    >>> compare("photos/", "feature-extract,partial", "runs/cmp", epochs=5).rows[0].val_accuracy
    """
    names = parse_strategies(strategies)
    for forbidden in ("strategy", "out", "data"):
        if forbidden in options:
            raise ConfigError(f"compare: {forbidden!r} is set by compare itself; leave it out of the options")
    options.setdefault("epochs", DEFAULT_COMPARE_EPOCHS)
    out = Path(out)
    base = TrainConfig(data=str(data), out=str(out / names[0]), strategy=names[0], **options)

    files = ["compare.json", "compare.html"] + [part for name in names for part in (name, f"{name}.log")]
    claim_folder(out, kind="compare", files=files, overwrite=overwrite)

    rows = []
    with tempfile.TemporaryDirectory(prefix="graft-compare-") as scratch:
        for number, name in enumerate(names, 1):
            reporter.say(f"compare [{number}/{len(names)}]: {name}")
            row = run_child(base.replace(strategy=name, out=str(out / name)), Path(scratch))
            if row.error:
                reporter.warn(f"{name} failed: {row.error}")
            else:
                reporter.say(
                    f"  {name}: accuracy {row.val_accuracy:.3f}, macro-F1 {row.macro_f1:.3f}, "
                    f"{row.wall_seconds:.1f} s, peak {row.peak_rss_mb:.0f} MB"
                )
            rows.append(row)

    json_path, html_path = out / "compare.json", out / "compare.html"
    write_json(json_path, {"data": str(data), "settings": {k: v for k, v in base.to_dict().items() if k not in ("out", "strategy")}, "rows": [asdict(r) for r in rows]})
    write_text(html_path, compare_html(rows, base, out))
    reporter.say(f"comparison written to {html_path}")
    return Comparison(rows=rows, json_path=json_path, html_path=html_path)


def run_child(config: TrainConfig, scratch: Path) -> CompareRow:
    """Train one strategy in a fresh Python process; its output goes to RUN.log beside RUN."""
    run_dir = Path(config.out)
    request, result = scratch / f"{config.strategy}.request.json", scratch / f"{config.strategy}.result.json"
    request.write_text(json.dumps(config.to_dict()), encoding="utf-8")
    log_path = run_dir.with_name(f"{run_dir.name}.log")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
    with log_path.open("w", encoding="utf-8") as log:
        code = subprocess.call(
            [sys.executable, "-m", "graft.report.compare_worker", str(request), str(result)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    empty = CompareRow(config.strategy, None, None, None, None, None, None, None, None, str(run_dir))
    if code != 0 or not result.is_file():
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        empty.error = f"exit code {code}; see {log_path}: " + " | ".join(tail)
        return empty
    measured = json.loads(result.read_text(encoding="utf-8"))
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    return CompareRow(
        strategy=config.strategy,
        val_accuracy=metrics["accuracy"],
        macro_f1=metrics["macro_f1"],
        wall_seconds=measured["wall_seconds"],
        train_seconds=metrics.get("train_seconds"),
        peak_rss_mb=measured["peak_rss_mb"],
        trainable_params=metrics.get("trainable_params"),
        total_params=metrics.get("total_params"),
        epochs_run=metrics.get("epochs_run"),
        run_dir=str(run_dir),
    )


def compare_html(rows: Sequence[CompareRow], base: TrainConfig, out: Path) -> str:
    """compare.html: the table, overlaid curves, and the forgetting chart of every strategy."""
    from graft.report import figures  # matplotlib loads only when a figure is drawn

    done = [r for r in rows if r.error is None]
    settings = ", ".join(
        f"{esc(k)}={esc(v)}" for k, v in base.to_dict().items() if k not in ("data", "out", "strategy")
    )
    parts = [
        f"<header><h1>graft compare: {esc(out.name)}</h1><p class=\"lead\">{len(rows)} strategies on {esc(base.data)}, "
        f"identical split, augmentation, epoch budget and seed.</p><p class=\"note\">Settings: {settings}</p></header>"
    ]
    table_rows = [
        (
            r.strategy, fmt(r.val_accuracy), fmt(r.macro_f1), fmt(r.wall_seconds, 1), fmt(r.peak_rss_mb, 0),
            f"{r.trainable_params:,}" if r.trainable_params is not None else "n/a", fmt(r.epochs_run),
            r.error or "ok",
        )
        for r in rows
    ]
    links = " · ".join(f'<a href="{esc(r.strategy)}/report.html">{esc(r.strategy)} report</a>' for r in done)
    parts.append(section("table", "Results", table(
        ["strategy", "val accuracy", "macro-F1", "wall time (s)", "peak memory (MB, max RSS)", "trainable params", "epochs run", "status"],
        table_rows,
    ) + f"<p>Each run's own report: {links}</p>"))

    histories, forgetting = {}, {}
    for r in done:
        run_dir = Path(r.run_dir)
        history_path, forgetting_path = run_dir / "history.jsonl", run_dir / "forgetting.json"
        if history_path.is_file():
            histories[r.strategy] = [json.loads(line) for line in history_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if forgetting_path.is_file():
            forgetting[r.strategy] = json.loads(forgetting_path.read_text(encoding="utf-8"))["stages"]
    if histories:
        curves = img(figures.figure_uri(figures.overlaid_curves(histories)), "learning curves of every strategy", "per epoch, one line per strategy")
    else:
        curves = note("no strategy finished, so there are no curves")
    parts.append(section("curves", "Learning curves", curves))
    if forgetting:
        chart = img(
            figures.figure_uri(figures.forgetting_chart(forgetting)), "forgetting per stage for every strategy",
            "weight drift ||w − w0|| / ||w0|| and linear CKA to the pretrained backbone, per stage and strategy",
        )
    else:
        chart = note("no forgetting.json was written by any run (their reports failed?)")
    parts.append(section("forgetting", "Forgetting per stage", chart))
    return page(f"graft compare: {out.name}", "\n".join(parts))
