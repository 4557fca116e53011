"""The report's sections for a multi-label run (several labels per image).

In place of accuracy, the confusion matrix, softmax calibration and the most confidently wrong
images, a label-set run's report shows its mAP and F1 at the per-label thresholds, a table of
every label worst AP first, how often the labels appear together in the training labels, and per
label the validation images scored most wrongly. Everything is read from what the run recorded:
`metrics.json`, the training label sets in `split.json` and every label's score of every
validation image in `val_predictions.json`; no model runs.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from graft.input.multilabel import multi_hot
from graft.report.parts import esc, fmt, gallery, img, note, scope_note, section, table, thumbnail

# The multi-label sections, in page order: (id, heading). Tests and readers rely on these ids.
LABEL_SET_SECTIONS: tuple[tuple[str, str], ...] = (
    ("per-label", "Per-label AP, precision, recall and F1"),
    ("cooccurrence", "Label co-occurrence in the training labels"),
    ("label-mistakes", "Worst validation images per label"),
)
# The history's `train_accuracy` and `val_accuracy` of a label-set run (`graft.training.multilabel`).
CURVE_SCORES = ("validation mAP, training exact label sets", "train: exact label sets at 0.5", "validation: macro mAP")
MAX_LABELS_SHOWN = 8  # labels with thumbnails, worst AP first: ~50 labels would make a page of megabytes
IMAGES_PER_SIDE = 3  # per label: the highest-scoring images without it, the lowest-scoring with it
THUMBNAIL_SIDE = 112  # the gallery's display size; up to 48 tiles
MAX_PAIRS = 12


def is_multilabel(metrics: Mapping[str, Any]) -> bool:
    """True for the metrics of a label-set run."""
    return metrics.get("task") == "multilabel"


def multilabel_cards(metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The headline of a label-set run: macro mAP, micro- and macro-F1 at the chosen thresholds."""
    names = metrics.get("class_names", [])
    measured = [name for name, row in metrics.get("per_class", {}).items() if row.get("ap") is not None]
    averaged = metrics.get("macro_f1_classes", names)
    return [
        ("validation mAP (macro)", fmt(metrics["map"]) + scope_note(len(measured), len(names), "labels")),
        ("micro-F1 at the thresholds", fmt(metrics["micro_f1"])),
        ("macro-F1 at the thresholds", fmt(metrics["macro_f1"]) + scope_note(len(averaged), len(names), "labels")),
    ]


def label_counts(metrics: Mapping[str, Any]) -> str:
    """The data section's counts of a label-set run: images per label, labels per image."""
    data = metrics.get("data", {})
    train_counts: Mapping[str, int] = data.get("train_per_class", {})
    val_counts: Mapping[str, int] = data.get("val_per_class", {})
    names = metrics["class_names"]
    rows: list[tuple[object, ...]] = [(name, train_counts.get(name, 0), val_counts.get(name, 0)) for name in names]
    rows.append(("images (any labels)", metrics.get("num_train", "?"), metrics.get("num_val", "?")))
    ratio = data.get("imbalance_ratio")
    summary = (
        f"<p>{len(names)} labels, {esc(data.get('mean_labels_per_image', '?'))} per training image on average; "
        f"{esc(data.get('images_without_label', '?'))} training images have none. "
        f"Split: {esc(data.get('split', '?'))} (seed {esc(data.get('seed', '?'))}). "
        f"Imbalance (most / least frequent label in training): <b>{esc(fmt(ratio, 2))}</b>"
        + (" — consider --class-weighting balanced." if isinstance(ratio, (int, float)) and ratio >= 3 else ".")
        + "</p>"
    )
    return summary + table(["label", "training images with it", "validation images with it"], rows)


def multilabel_sections(run: Any, figures: Any) -> list[str]:
    """The label-set sections of the report (`LABEL_SET_SECTIONS`) for a `graft.report.html.Run`."""
    per_label, cooccurrence, mistakes = LABEL_SET_SECTIONS
    return [
        section(*per_label, per_label_section(run.metrics)),
        section(*cooccurrence, cooccurrence_section(run.metrics["class_names"], run.split, figures)),
        section(*mistakes, label_mistakes_section(run, figures)),
    ]


def worst_first(per_class: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Label names by validation AP, lowest first; labels without a validation positive (no AP) last."""
    return sorted(per_class, key=lambda name: (per_class[name].get("ap") is None, per_class[name].get("ap") or 0.0))


def per_label_section(metrics: Mapping[str, Any]) -> str:
    """Every label's AP, precision, recall, F1, support and threshold, worst AP first."""
    per_class = metrics.get("per_class", {})
    rows = [
        (name, fmt(v.get("ap")), fmt(v.get("precision")), fmt(v.get("recall")), fmt(v.get("f1")), v.get("support", ""),
         fmt(v.get("threshold")))
        for name, v in ((name, per_class[name]) for name in worst_first(per_class))
    ]
    return table(["label", "AP", "precision", "recall", "F1", "support", "threshold"], rows) + note(
        "On the validation images, worst AP first. AP ranks the images by the label's score (no threshold); precision, "
        "recall and F1 are at the label's threshold, chosen on validation to maximise its F1 and stored in the bundle. "
        "n/a: no validation image has the label. Support: validation images with it."
    )


def cooccurrence_counts(split: Mapping[str, Any], label_names: list[str]) -> np.ndarray:
    """(C, C) training images holding both labels, read from split.json's training label sets
    (names joined by ';'); the diagonal counts each label's images."""
    sets = [frozenset(names.split(";")) if names else frozenset() for _, names in split.get("train", [])]
    targets = multi_hot(sets, label_names)
    return targets.T @ targets


def cooccurrence_section(label_names: list[str], split: Mapping[str, Any], figures: Any) -> str:
    """The co-occurrence heatmap of the training labels and the pairs seen together most often."""
    if any(";" in name for name in label_names):  # split.json joins a set's names with ';'
        return note("split.json's label sets cannot be read back: a label name holds ';' (the CSV separates its labels with '|').")
    counts = cooccurrence_counts(split, label_names)
    together = [(int(counts[i, j]), i, j) for i in range(len(label_names)) for j in range(i + 1, len(label_names)) if counts[i, j]]
    together.sort(key=lambda pair: (-pair[0], pair[1], pair[2]))
    chart = img(
        figures.figure_uri(figures.label_cooccurrence(counts, label_names)), "label co-occurrence",
        "cell (row, column): training images with both labels; shading: share of the row label's images that also "
        "have the column label; diagonal: the label's training images",
    )
    if not together:
        return chart + "<p>No two labels appear on the same training image.</p>"
    pairs = table(
        ["label", "with label", "training images with both", "share of the first's images", "share of the second's"],
        [(label_names[i], label_names[j], n, fmt(n / max(int(counts[i, i]), 1)), fmt(n / max(int(counts[j, j]), 1)))
         for n, i, j in together[:MAX_PAIRS]],
    )
    return chart + f"<p>{len(together)} pairs of labels appear together; the most frequent:</p>" + pairs


def label_mistakes_section(run: Any, figures: Any) -> str:
    """Per label, worst AP first: the highest-scoring validation images without it (false positives
    when at or above its threshold) and the lowest-scoring ones with it (misses when below)."""
    if not run.predictions:
        return note("val_predictions.json is missing: no per-image scores to show.")
    per_class = run.metrics["per_class"]
    shown = worst_first(per_class)[:MAX_LABELS_SHOWN]
    blocks = [_label_block(run, figures, name, per_class[name]) for name in shown]
    false_positives = sum(1 for name, v in per_class.items() for r in run.predictions
                          if name not in r["true"] and r["scores"][name] >= v["threshold"])
    misses = sum(1 for name, v in per_class.items() for r in run.predictions if name in r["true"] and r["scores"][name] < v["threshold"])
    intro = (f"<p>At the thresholds: {false_positives} false positive(s) and {misses} miss(es) over {len(per_class)} labels and "
             f"{len(run.predictions)} validation images. Below, the {len(shown)} labels with the lowest AP, each with its "
             f"{IMAGES_PER_SIDE} highest-scoring images without the label and {IMAGES_PER_SIDE} lowest-scoring with it; "
             "red: on the wrong side of the threshold. Every score: val_predictions.json.</p>")
    return intro + "".join(blocks)


def _label_block(run: Any, figures: Any, name: str, scores: Mapping[str, Any]) -> str:
    """One label's heading, then its two groups of thumbnails side by side."""
    threshold = scores["threshold"]
    negatives = sorted((r for r in run.predictions if name not in r["true"]), key=lambda r: -r["scores"][name])
    positives = sorted((r for r in run.predictions if name in r["true"]), key=lambda r: r["scores"][name])
    groups = []
    for title, chosen, wrong_word, is_wrong in (
        ("highest-scoring without it", negatives, "false positive", lambda s: s >= threshold),
        ("lowest-scoring with it", positives, "missed", lambda s: s < threshold),
    ):
        tiles = [_tile(run, figures, row, row["scores"][name], wrong_word if is_wrong(row["scores"][name]) else "")
                 for row in chosen[:IMAGES_PER_SIDE]]
        groups.append(f"<div><p>{esc(title)}:</p>" + (gallery(tiles) if tiles else note("no such validation image")) + "</div>")
    heading = f"<h3>{esc(name)}: AP {esc(fmt(scores.get('ap')))}, threshold {esc(fmt(threshold))}</h3>"
    return heading + '<div style="display: flex; flex-wrap: wrap; column-gap: 2.5rem">' + "".join(groups) + "</div>"


def _tile(run: Any, figures: Any, row: Mapping[str, Any], score: float, wrong: str) -> str | None:
    verdict = f'<b class="bad">{esc(wrong)}</b> ' if wrong else ""
    caption = (f"{verdict}score {score:.3f}<br>labels: {esc('; '.join(row['true']) or 'none')}<br>{esc(row['path'])}")
    return thumbnail(run.data_root / row["path"], row["path"], caption, figures, side=THUMBNAIL_SIDE)
