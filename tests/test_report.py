"""The run report on a real run: every section, embedded figures, a real browser, show-features."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from _html import decode_png, open_in_chromium, parse_page
from graft.report.html import MULTILABEL_SECTIONS, SECTIONS

FIGURE_SECTIONS = ("curves", "confusion", "calibration", "filters", "feature-maps", "forgetting")


def test_report_has_every_section_with_embedded_figures(trained_run):
    report = trained_run.run_dir / "report.html"
    page = parse_page(report)
    metrics = json.loads((trained_run.run_dir / "metrics.json").read_text())
    for section_id, heading in SECTIONS:
        assert section_id in page.sections, f"section #{section_id} missing"
        assert page.sections[section_id].heading.strip() == heading
    for section_id in FIGURE_SECTIONS:
        images = page.sections[section_id].images
        assert images, f"#{section_id} has no figure"
        for src in images:
            decode_png(src)
    # Self-contained: nothing is fetched, no script can fail offline.
    assert all(r.startswith("data:image/png;base64,") or not r.startswith(("http", "//", "/")) for r in page.resources)
    assert not {"script", "link", "iframe"} & page.tags

    data = page.sections["data"]
    for name in metrics["class_names"]:
        assert name in data.text
    assert "Bad images skipped: none" in data.text and "Imbalance" in data.text
    # One audit row per stage plus the head (and the header row).
    strategy = page.sections["strategy"]
    stages = json.loads((trained_run.run_dir / "forgetting.json").read_text())["stages"]
    assert strategy.table_rows == len(stages) + 2 and "feature-extract" in strategy.text
    per_class = page.sections["per-class"]
    assert per_class.table_rows == len(metrics["class_names"]) + 1
    assert f"{metrics['per_class']['bag']['f1']:.3f}" in per_class.text

    predictions = json.loads((trained_run.run_dir / "val_predictions.json").read_text())
    wrong = [r for r in predictions if r["label"] != r["true"]]
    mistakes = page.sections["mistakes"]
    if wrong:
        assert len(mistakes.images) == min(len(wrong), 12)
        for src in mistakes.images:
            decode_png(src)
        assert wrong[0]["path"] in mistakes.text
    else:
        assert "classified correctly" in mistakes.text


def test_the_report_of_a_multilabel_run_shows_label_sets(multilabel_run):
    """A label-set run's report: mAP and F1 at the thresholds as its headline, every label's AP
    table worst first with metrics.json's values, the co-occurrence of the training labels,
    thumbnails of each label's worst validation images with their scores, and none of the
    sections that read one label per image."""
    report = multilabel_run.run_dir / "report.html"
    raw = report.read_text(encoding="utf-8")
    page = parse_page(report)
    metrics = json.loads((multilabel_run.run_dir / "metrics.json").read_text())
    per_class = metrics["per_class"]
    assert list(page.sections) == [section_id for section_id, _ in MULTILABEL_SECTIONS]
    for section_id, heading in MULTILABEL_SECTIONS:
        assert page.sections[section_id].heading.strip() == heading
    assert not {"confusion", "calibration", "mistakes", "per-class"} & set(page.sections)
    assert "Confusion matrix" not in raw and "validation accuracy" not in raw.split("</header>")[0]
    assert f"validation mAP (macro)<b>{metrics['map']:.3f}" in raw
    assert f"micro-F1 at the thresholds<b>{metrics['micro_f1']:.3f}" in raw
    assert f"macro-F1 at the thresholds<b>{metrics['macro_f1']:.3f}" in raw

    # One row per label, worst AP first, with the values metrics.json holds.
    table = page.sections["per-label"]
    assert table.table_rows == len(per_class) + 1
    cells = {name: f"{name}{v['ap']:.3f}{v['precision']:.3f}{v['recall']:.3f}{v['f1']:.3f}{v['support']}{v['threshold']:.3f}"
             for name, v in per_class.items()}
    positions = {name: table.text.index(row) for name, row in cells.items()}
    assert sorted(positions, key=positions.get) == sorted(per_class, key=lambda name: per_class[name]["ap"])

    # Co-occurrence of the training label sets of split.json: the heatmap and the pairs.
    train = json.loads((multilabel_run.run_dir / "split.json").read_text())["train"]
    both = sum(1 for _, names in train if {"dark", "top"} <= set(names.split(";")))
    assert both > 0 and not any({"footwear", "top"} <= set(names.split(";")) for _, names in train)
    cooccurrence = page.sections["cooccurrence"]
    assert len(cooccurrence.images) == 1 and decode_png(cooccurrence.images[0]).width > 200
    assert f"darktop{both}" in cooccurrence.text and "footweartop" not in cooccurrence.text

    # Per label: its 3 highest-scoring validation images without it, its 3 lowest-scoring with it.
    predictions = json.loads((multilabel_run.run_dir / "val_predictions.json").read_text())
    mistakes = page.sections["label-mistakes"]
    assert len(mistakes.images) == 6 * len(per_class)
    for src in mistakes.images:
        decode_png(src)
    worst = min(per_class, key=lambda name: per_class[name]["ap"])
    negative = max((r for r in predictions if worst not in r["true"]), key=lambda r: r["scores"][worst])
    missed = min((r for r in predictions if worst in r["true"]), key=lambda r: r["scores"][worst])
    block = mistakes.text.split(f"{worst}: AP {per_class[worst]['ap']:.3f}")[1].split(": AP ")[0]
    assert block.index(negative["path"]) < block.index(missed["path"])
    assert f"score {negative['scores'][worst]:.3f}" in block and f"score {missed['scores'][worst]:.3f}" in block
    assert not {"script", "link", "iframe"} & page.tags
    errors, images = open_in_chromium(report)
    assert errors == [] and all(image["complete"] and image["naturalWidth"] > 0 for image in images)


def test_the_cooccurrence_of_fifty_labels_stays_one_readable_figure():
    """~50 labels: smaller cells, names still on both axes, no count written in 2,500 cells."""
    from graft.report.figures import figure_uri, label_cooccurrence

    names = [f"keyword-{i:02d}" for i in range(50)]
    counts = np.diag(np.arange(10, 60))
    counts[3, 7] = counts[7, 3] = 9
    fig = label_cooccurrence(counts, names)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == names == [t.get_text() for t in ax.get_yticklabels()]
    assert len(ax.texts) == 0 and fig.get_figwidth() < 15
    small = label_cooccurrence(counts[:3, :3], names[:3]).axes[0]
    assert sorted(t.get_text() for t in small.texts) == ["0", "0", "0", "0", "0", "0", "10", "11", "12"]
    decode_png(figure_uri(fig))


def test_the_report_of_a_default_run_explains_what_auto_measured_and_kept(fashion_folder, tmp_path):
    """`graft.train` with no strategy runs auto; its report shows every candidate auto scored on
    validation (accuracy, standard error), its choice and why, and the kept strategy's audit and
    settings, all as recorded in metrics.json while the run trained."""
    import graft

    run = graft.train(fashion_folder, out=tmp_path / "run", epochs=2, verbose=False, cache_dir=str(tmp_path / "c"))
    auto = run.metrics["auto"]
    assert run.metrics["strategy"] == "auto" == json.loads((run.run_dir / "config.json").read_text())["strategy"]
    page = parse_page(run.run_dir / "report.html")
    section = page.sections["strategy"]
    # Every framing and pooling probe, then the trained strategy, each with what validation said.
    assert [c["kind"] for c in auto["candidates"]] == ["framing"] * 2 + ["pooling"] * 4 + ["trained"]
    assert [c["name"] for c in auto["candidates"][:6]] == ["crop 0.875", "crop 1", "avg", "grid", "grid-2", "grid-3"]
    validation_images = auto["framing"]["images"][1]
    for candidate in auto["candidates"]:  # each accuracy's binomial standard error on those images
        accuracy = candidate["accuracy"]
        assert candidate["standard_error"] == pytest.approx((accuracy * (1 - accuracy) / validation_images) ** 0.5, abs=2e-3)
        assert f"{candidate['accuracy']:.3f}{candidate['standard_error']:.3f}" in section.text  # two cells of its row
    assert sum(c["chosen"] for c in auto["candidates"]) == 3  # a framing, a pooling, the kept strategy
    assert auto["rule"] in section.text and auto["reason"] in section.text
    assert f"kept {auto['kept']}" in section.text and auto["kept"] == "feature-extract"
    # The kept strategy's audit: frozen stages with BatchNorm in eval mode, the head trains.
    stages = json.loads((run.run_dir / "forgetting.json").read_text())["stages"]
    assert [row["bn_mode"] for row in auto["audit"][:-1]] == ["eval"] * len(stages)
    assert auto["audit"][-1]["trainable_params"] == run.metrics["trainable_params"] > 0
    assert section.table_rows == (len(auto["candidates"]) + 1) + (len(stages) + 2)
    assert "?" not in section.text.split("What feature-extract trained")[1]
    # Its settings resolved: the strategy's defaults where none was given, the measured view.
    settings = auto["settings"]
    assert settings["strategy"] == "feature-extract" and "train_stages" not in settings  # no fine-tuning setting
    assert settings["pooling"] == auto["pooling"]["chose"] and settings["crop_pct"] == auto["framing"]["crop_pct"]
    assert settings["head_solver"] == ("adamw" if settings["pooling"] == "avg" else "lbfgs")
    if settings["head_solver"] == "adamw":  # the user's epochs, the strategy's rate
        assert settings["epochs"] == 2 and settings["lr"] == 1e-3 and "lr=0.001" in section.text
    else:  # L-BFGS solves the head: no epochs or rate to show
        assert "epochs" not in settings and "lr" not in settings
    assert "=None" not in section.text and f"images per class {auto['measured']['images_per_class']:g}," in section.text
    assert "auto: feature-extract" in (run.run_dir / "report.html").read_text()


def test_learning_curves_mark_thawed_stages(tmp_path):
    from graft.report.figures import figure_uri, learning_curves

    history = [
        {"epoch": e, "train_loss": 1 / (e + 1), "val_loss": 1.2 / (e + 1), "train_accuracy": e / 5, "val_accuracy": e / 6,
         "lr": [0.1], "seconds": 0.1, "stage_thawed": "blocks.6" if e == 2 else None}
        for e in range(5)
    ]
    fig = learning_curves(history, best_epoch=3)
    loss_ax, acc_ax = fig.axes
    dashed = [line for line in loss_ax.get_lines() if line.get_linestyle() == "--"]
    assert [list(line.get_xdata()) for line in dashed] == [[3, 3]]  # epoch index 2 is shown as epoch 3
    assert any(text.get_text() == "blocks.6" for text in acc_ax.texts)
    decode_png(figure_uri(fig))


def test_report_opens_in_chromium_without_errors(trained_run):
    errors, images = open_in_chromium(trained_run.run_dir / "report.html")
    assert errors == []
    assert len(images) >= len(FIGURE_SECTIONS)
    assert all(image["complete"] and image["naturalWidth"] > 0 for image in images), images


def test_a_failing_report_warns_and_keeps_the_run(tmp_path):
    from graft.api import write_run_report
    from graft.console import Reporter

    out = io.StringIO()
    write_run_report(tmp_path, Reporter(console=Console(file=out, width=300)))  # no metrics.json there
    assert "report could not be written" in out.getvalue() and "metrics.json" in out.getvalue()
    assert not (tmp_path / "report.html").exists()


def test_show_features_writes_a_png_for_chosen_stages(trained_run, holdout_folder, tmp_path):
    from graft.cli.main import main

    image = sorted(holdout_folder.rglob("*.png"))[0]
    out = tmp_path / "maps.png"
    assert main(["show-features", str(trained_run.bundle_dir), str(image), "--stages", "0,blocks.2,-1", "--channels", "3", "--out", str(out)]) == 0
    two_stages = tmp_path / "two.png"
    assert main(["show-features", str(trained_run.bundle_dir), str(image), "--stages", "1,-1", "--channels", "3", "--out", str(two_stages)]) == 0
    # One row per chosen stage: three stages draw a taller figure than two.
    assert Image.open(out).height > Image.open(two_stages).height > 0


def test_show_features_rejects_an_unknown_stage(trained_run, holdout_folder, tmp_path, capsys):
    from graft.cli.main import main

    image = sorted(holdout_folder.rglob("*.png"))[0]
    assert main(["show-features", str(trained_run.bundle_dir), str(image), "--stages", "99", "--out", str(tmp_path / "m.png")]) == 2
    message = capsys.readouterr().err
    assert "--stages" in message and "'99'" in message and "blocks.0" in message


def test_header_says_when_macro_f1_averages_fewer_classes(tmp_path):
    from types import SimpleNamespace

    from graft.report.html import header

    metrics = {"accuracy": 0.6, "macro_f1": 0.375, "class_names": ["bag", "sneaker", "trouser"],
               "macro_f1_classes": ["bag", "trouser"]}
    assert "0.375 (over 2 of 3 classes)" in header(SimpleNamespace(metrics=metrics, dir=tmp_path, data_root="photos"))
    metrics["macro_f1_classes"] = metrics["class_names"]
    assert "(over" not in header(SimpleNamespace(metrics=metrics, dir=tmp_path, data_root="photos"))
