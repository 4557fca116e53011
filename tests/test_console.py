"""What graft prints: user strings (file, folder and class names) appear exactly as written."""

import shutil
from pathlib import Path

import pytest

from graft.cli.main import main

# Each is rich markup or an emoji code if read as such: `[edited]` and `[copy]` vanish, `[/b]`
# (a folder `a[` holding `b]c.png`) is a closing tag that matches nothing, `:smile:` becomes 😄.
ODD_NAMES = ("photo[edited].png", "[copy] notes.png", "a[/b]c.png", "x :smile: [bold]y.png")


@pytest.fixture
def wide_console(monkeypatch):
    # rich wraps at 80 columns when not on a terminal; long temporary paths must stay on one line.
    monkeypatch.setenv("COLUMNS", "1000")


def _odd_folder(source: Path, root: Path) -> Path:
    """Real images of `source/bag` under names that look like markup, plus one unreadable."""
    folder = root / "bag"
    folder.mkdir(parents=True)
    images = sorted((source / "bag").glob("*.png"))
    for name, image in zip(ODD_NAMES, images):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, folder / name)
    (folder / "[b]broken[i].png").write_bytes(b"not an image")
    return root


def test_predict_table_prints_odd_file_names_as_written(trained_run, holdout_folder, tmp_path, capsys, wide_console):
    folder = _odd_folder(holdout_folder, tmp_path / "odd") / "bag"
    code = main(["predict", str(trained_run.bundle_dir), str(folder)])
    captured = capsys.readouterr()
    assert code == 1, captured.err  # the unreadable one
    for name in ODD_NAMES:
        assert str(folder / name) in captured.out
    assert "😄" not in captured.out
    assert f"skipped {folder / '[b]broken[i].png'}" in captured.err


def test_evaluate_warnings_print_odd_file_names_as_written(trained_run, holdout_folder, tmp_path, capsys, wide_console):
    root = _odd_folder(holdout_folder, tmp_path / "odd")
    assert main(["evaluate", str(trained_run.bundle_dir), str(root), "--on-bad-image", "skip"]) == 0
    captured = capsys.readouterr()
    assert f"warning: skipped {root / 'bag' / '[b]broken[i].png'}: not an image file" in captured.err
    assert "images: accuracy" in captured.out


def test_train_warnings_and_tables_print_odd_names_as_written(fashion_folder, tmp_path, capsys, wide_console):
    root = tmp_path / "data [v2]"
    for name in ("sneaker", "trouser"):
        shutil.copytree(fashion_folder / name, root / f"{name} [/i]")
    _odd_folder(fashion_folder, root)
    out = tmp_path / "run[1]"
    code = main(["train", str(root), "--out", str(out), "--strategy", "feature-extract", "--epochs", "1", "--on-bad-image", "skip"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"warning: skipped {root / 'bag' / '[b]broken[i].png'}: not an image file" in captured.err
    assert f"from {root}" in captured.err and f"run written to {out}" in captured.err


def test_reporter_prints_markup_literally_on_any_console():
    from rich.console import Console

    from graft.console import Reporter

    console = Console(record=True, width=200, markup=True, emoji=True)  # a caller's console, markup on
    reporter = Reporter(console=console)
    reporter.say("a[/b]c.png :smile:")
    reporter.warn("[copy] notes.jpg")
    reporter.table("in [dim]x[/dim]", ["name", "[b]"], [("photo[edited].png", "[/i]")])
    with reporter.progress("features ([x])", total=1) as advance:
        advance(1, status="[/red]")
    text = console.export_text()
    for literal in ("a[/b]c.png :smile:", "warning: [copy] notes.jpg", "in [dim]x[/dim]", "photo[edited].png", "[/i]",
                    "[b]", "features ([x])", "[/red]"):
        assert literal in text
