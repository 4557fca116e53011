"""`graft compare` on a small real folder: one child process per strategy, one report."""

from __future__ import annotations

import json

import pytest

from _html import decode_png, open_in_chromium, parse_page
from graft.errors import ConfigError
from graft.report.compare import compare, parse_strategies
from graft.strategies import STRATEGY_NAMES

# `partial` trains backbone stages: the comparison must hold more than head-only strategies.
STRATEGIES = ["feature-extract", "linear-probe"] + [s for s in ("partial",) if s in STRATEGY_NAMES]


@pytest.fixture(scope="module")
def comparison(fashion_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "cmp"
    return compare(fashion_folder, ",".join(STRATEGIES), out, epochs=2, seed=3, augment="light")


@pytest.mark.slow
def test_compare_writes_one_row_per_strategy(comparison):
    recorded = json.loads(comparison.json_path.read_text())
    rows = recorded["rows"]
    assert [row["strategy"] for row in rows] == STRATEGIES
    assert recorded["settings"]["epochs"] == 2 and recorded["settings"]["seed"] == 3
    for row in rows:
        assert row["error"] is None, row["error"]
        assert 0.0 <= row["val_accuracy"] <= 1.0 and 0.0 <= row["macro_f1"] <= 1.0
        assert row["wall_seconds"] > 0 and row["trainable_params"] > 0
        # Each strategy ran in its own process that loaded torch and a backbone: well over 100 MB.
        assert 100 < row["peak_rss_mb"] < 20_000
        assert row["epochs_run"] <= 2
    by_name = {row["strategy"]: row for row in rows}
    if "partial" in by_name:
        assert by_name["partial"]["trainable_params"] > by_name["feature-extract"]["trainable_params"]


@pytest.mark.slow
def test_compare_runs_share_split_budget_and_seed(comparison):
    runs = [comparison.json_path.parent / name for name in STRATEGIES]
    splits = [json.loads((run / "split.json").read_text()) for run in runs]
    assert all(split == splits[0] for split in splits)
    configs = [json.loads((run / "config.json").read_text()) for run in runs]
    for config, name in zip(configs, STRATEGIES):
        assert config["strategy"] == name
        assert {k: v for k, v in config.items() if k not in ("strategy", "out")} == {
            k: v for k, v in configs[0].items() if k not in ("strategy", "out")
        }
    for run in runs:
        assert (run / "report.html").is_file() and (run / "forgetting.json").is_file()


@pytest.mark.slow
def test_compare_html_has_the_table_curves_and_forgetting(comparison):
    page = parse_page(comparison.html_path)
    assert {"table", "curves", "forgetting"} <= set(page.sections)
    assert page.sections["table"].table_rows == len(STRATEGIES) + 1
    for name in STRATEGIES:
        assert name in page.sections["table"].text
    for section in ("curves", "forgetting"):
        [src] = page.sections[section].images
        decode_png(src)
    errors, images = open_in_chromium(comparison.html_path)
    assert errors == [] and images and all(image["naturalWidth"] > 0 for image in images)


def test_compare_refuses_bad_strategy_lists():
    with pytest.raises(ConfigError, match="^strategies: .*'nope'"):
        parse_strategies("feature-extract,nope")
    with pytest.raises(ConfigError, match="at least two"):
        parse_strategies("feature-extract")
    with pytest.raises(ConfigError, match="twice"):
        parse_strategies("feature-extract,linear-probe,feature-extract")
    assert parse_strategies(" feature-extract , linear-probe ") == ["feature-extract", "linear-probe"]


def test_compare_cli_names_the_bad_option(fashion_folder, tmp_path, capsys):
    from graft.cli.main import main

    assert main(["compare", str(fashion_folder), "--strategies", "feature-extract,nope", "--out", str(tmp_path / "cmp")]) == 2
    assert "--strategies" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()  # refused before anything was trained or written
