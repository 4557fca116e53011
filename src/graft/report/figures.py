"""The report's figures: matplotlib (Agg) figures rendered to PNG and embedded as base64 data URIs.

Figures are built with `matplotlib.figure.Figure` and the Agg canvas directly, never through
`pyplot`: no global backend is switched and no figure registry grows in a user's notebook.
matplotlib is imported here only, so `import graft` stays light.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from graft.extras import require_extra

require_extra("report", "matplotlib")  # a missing matplotlib names the extra to install

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    """A new Agg figure of `width` x `height` inches."""
    fig = Figure(figsize=(width, height), dpi=100, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def figure_uri(fig: Figure) -> str:
    """The figure as a `data:image/png;base64,...` URI."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return png_uri(buffer.getvalue())


def image_uri(image: Image.Image, max_side: int | None = None) -> str:
    """A PIL image as a PNG data URI, shrunk to `max_side` pixels on its longer side if given."""
    if max_side is not None and max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return png_uri(buffer.getvalue())


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def learning_curves(history: Sequence[Mapping[str, Any]], best_epoch: int | None = None,
                    score: tuple[str, str, str] = ("accuracy", "train", "validation")) -> Figure:
    """Loss and accuracy per epoch (train and validation); thawed stages marked as dashed lines.

    `score` names the right panel and its two lines (the history's `train_accuracy` and
    `val_accuracy`): (title, training line, validation line)."""
    fig = figure(10, 3.6)
    loss_ax, acc_ax = fig.subplots(1, 2)
    epochs = [row["epoch"] + 1 for row in history]
    loss_ax.plot(epochs, [row["train_loss"] for row in history], label="train", color=PALETTE[0])
    loss_ax.plot(epochs, [row["val_loss"] for row in history], label="validation", color=PALETTE[1])
    acc_ax.plot(epochs, [row["train_accuracy"] for row in history], label=score[1], color=PALETTE[0])
    acc_ax.plot(epochs, [row["val_accuracy"] for row in history], label=score[2], color=PALETTE[1])
    for row in history:
        if row.get("stage_thawed"):
            for ax in (loss_ax, acc_ax):
                ax.axvline(row["epoch"] + 1, color="0.45", linestyle="--", linewidth=1)
            acc_ax.annotate(
                str(row["stage_thawed"]), (row["epoch"] + 1, 0.02), rotation=90, fontsize=7,
                color="0.3", xycoords=("data", "axes fraction"), va="bottom", ha="right",
            )
    if best_epoch is not None and best_epoch >= 0 and history:  # -1: the starting model was kept
        acc_ax.axvline(best_epoch + 1, color=PALETTE[2], linewidth=1, alpha=0.7, label="best epoch")
    loss_ax.set(title="loss", xlabel="epoch")
    acc_ax.set(title=score[0], xlabel="epoch", ylim=(0, 1.02))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def confusion_matrix(matrix: Sequence[Sequence[int]], class_names: Sequence[str]) -> Figure:
    """Counts, rows = true class, columns = predicted; cells shaded by the row's fraction."""
    counts = np.asarray(matrix, dtype=float)
    fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    return count_heatmap(counts, fractions, class_names, xlabel="predicted", ylabel="true", shading="fraction of the true class")


def label_cooccurrence(counts: np.ndarray, label_names: Sequence[str]) -> Figure:
    """Images holding both labels (row, column); each cell shaded by the share of the row label's
    images that also hold the column label. The diagonal counts each label's images, unshaded."""
    counts = np.asarray(counts, dtype=float)
    fractions = counts / np.maximum(np.diag(counts)[:, None], 1)
    np.fill_diagonal(fractions, 0.0)
    # Many labels: smaller cells, so that ~50 names still fit a readable page-wide figure.
    cell = 0.38 if len(label_names) <= 25 else 0.22
    return count_heatmap(counts, fractions, label_names, xlabel="also has", ylabel="images with",
                         shading="share of the row label's images", cell=cell)


def count_heatmap(counts: np.ndarray, fractions: np.ndarray, names: Sequence[str], *, xlabel: str, ylabel: str,
                  shading: str, cell: float = 0.38) -> Figure:
    """A square matrix of counts over `names`, cells shaded by `fractions` (0 to 1); the counts are
    written in the cells up to 25 names."""
    size = max(3.5, cell * len(names) + 2)
    fig = figure(size + 1, size)
    ax = fig.subplots()
    shown = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(names))
    fontsize = 8 if cell >= 0.3 else 6
    ax.set_xticks(ticks, names, rotation=45 if cell >= 0.3 else 90, ha="right" if cell >= 0.3 else "center", fontsize=fontsize)
    ax.set_yticks(ticks, names, fontsize=fontsize)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    if len(names) <= 25:
        for i in ticks:
            for j in ticks:
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                        color="white" if fractions[i, j] > 0.55 else "black")
    fig.colorbar(shown, ax=ax, label=shading)
    return fig


def filter_grid(weights: np.ndarray, scale: float) -> np.ndarray:
    """First-layer kernels (out, 3, k, k) tiled into one RGB image in [0, 1] (mid-grey = 0).

    All kernels share one `scale` (the largest |weight| of the pretrained kernels) so that the
    before and after grids can be compared by eye.
    """
    count, channels, height, width = weights.shape
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.ones((rows * (height + 1) + 1, columns * (width + 1) + 1, 3))
    for k in range(count):
        kernel = weights[k, :3] if channels >= 3 else np.repeat(weights[k, :1], 3, axis=0)
        tile = np.clip(0.5 + 0.5 * kernel.transpose(1, 2, 0) / max(scale, 1e-12), 0, 1)
        r, c = divmod(k, columns)
        grid[1 + r * (height + 1) : 1 + r * (height + 1) + height, 1 + c * (width + 1) : 1 + c * (width + 1) + width] = tile
    return grid


def first_layer_filters(before: np.ndarray, after: np.ndarray) -> Figure:
    """The first convolution's kernels as RGB tiles: pretrained, trained, and their difference."""
    scale = float(np.abs(before).max())
    change = after - before
    fig = figure(10, 3.6)
    axes = fig.subplots(1, 3)
    panels = [
        (filter_grid(before, scale), "pretrained"),
        (filter_grid(after, scale), "after training"),
        (filter_grid(change, max(float(np.abs(change).max()), 1e-12)), f"change (max |Δ| {float(np.abs(change).max()):.2g})"),
    ]
    for ax, (image, title) in zip(axes, panels):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    return fig


def feature_maps(image: np.ndarray, maps: Mapping[str, np.ndarray], channels: int) -> Figure:
    """The input image, then per stage (one row) its `channels` most active channels.

    `maps` is {stage label: (C, H, W) activations for this one image}.
    """
    rows = max(1, len(maps))
    height = 1.75 * rows
    fig = figure(1.4 * (channels + 1), height, layout=None)
    # A fixed grid: constrained layout costs seconds on dozens of image axes and gains nothing here.
    axes = np.asarray(fig.subplots(rows, channels + 1, squeeze=False, gridspec_kw=dict(
        left=0.01, right=0.99, top=1 - 0.22 / height, bottom=0.12 / height, wspace=0.08, hspace=0.45,
    )))
    for row, (label, activation) in enumerate(maps.items()):
        axes[row, 0].imshow(image)
        top = axes[row, 0].get_position().y1
        fig.text(0.01, top + 0.06 / height, label, fontsize=8, weight="bold", va="bottom")
        # The most active channels on this image are the ones worth looking at.
        order = np.argsort(-activation.reshape(activation.shape[0], -1).mean(axis=1))[:channels]
        for col in range(channels):
            ax = axes[row, col + 1]
            if col < len(order):
                ax.imshow(activation[order[col]], cmap="viridis")
                ax.set_xlabel(f"channel {int(order[col])}", fontsize=6, labelpad=1)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    return fig


def forgetting_chart(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> Figure:
    """Weight drift and linear CKA per stage; one bar per run in each stage's group.

    `runs` is {label: [StageForgetting.to_dict(), ...]}; missing values show as no bar.
    """
    first = next(iter(runs.values()), [])
    labels = [f"{row['index']}: {row['name'][:18]}" for row in first]
    width = 0.8 / max(1, len(runs))
    fig = figure(max(7.0, 0.9 * len(labels) + 3), 3.8)
    drift_ax, cka_ax = fig.subplots(1, 2)
    positions = np.arange(len(labels))
    for n, (name, rows) in enumerate(runs.items()):
        offset = positions - 0.4 + width * (n + 0.5)
        drift = [row["drift"] if row["drift"] is not None else np.nan for row in rows]
        cka = [row["cka"] if row["cka"] is not None else np.nan for row in rows]
        color = PALETTE[n % len(PALETTE)]
        drift_ax.bar(offset[: len(drift)], drift, width, label=name, color=color)
        cka_ax.bar(offset[: len(cka)], cka, width, label=name, color=color)
    drift_ax.set(title="weight drift ||w − w0|| / ||w0|| (0 = untouched)", ylabel="relative L2 drift")
    finite = [row["drift"] for rows in runs.values() for row in rows if row["drift"] is not None]
    drift_ax.set_ylim(0, max(0.05, 1.15 * max(finite, default=0.0)))
    if finite and max(finite) == 0.0:
        drift_ax.text(0.5, 0.5, "0 in every stage: the backbone is untouched", transform=drift_ax.transAxes,
                      ha="center", va="center", fontsize=9, color="0.35")
    cka_ax.set(title="feature similarity to pretrained (linear CKA, 1 = same)", ylabel="linear CKA", ylim=(0, 1.05))
    for ax in (drift_ax, cka_ax):
        ax.set_xticks(positions, labels, rotation=45, ha="right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        ax.title.set_fontsize(9)
    if len(runs) > 1:
        cka_ax.legend(fontsize=8, loc="lower left")
    return fig


def overlaid_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]]) -> Figure:
    """Validation accuracy, validation loss and training loss per epoch, one line per run."""
    fig = figure(12, 3.6)
    axes = fig.subplots(1, 3)
    keys = [("val_accuracy", "validation accuracy"), ("val_loss", "validation loss"), ("train_loss", "training loss")]
    for n, (name, history) in enumerate(histories.items()):
        epochs = [row["epoch"] + 1 for row in history]
        for ax, (key, _) in zip(axes, keys):
            ax.plot(epochs, [row[key] for row in history], label=name, color=PALETTE[n % len(PALETTE)])
    for ax, (_, title) in zip(axes, keys):
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig


def reliability_diagram(calibration: Mapping[str, Any]) -> Figure:
    """Accuracy against confidence per bin, before and after temperature scaling (metrics.json's
    `calibration`); the diagonal is perfect calibration, bars below it over-confidence."""
    fig = figure(10, 3.8)
    axes = fig.subplots(1, 2, sharey=True)
    bins = int(calibration["bins"])
    width = 1.0 / bins
    centres = (np.arange(bins) + 0.5) * width
    titles = {"before": "before (T = 1)", "after": f"after (T = {calibration['temperature']:.3g})"}
    for ax, (name, title) in zip(axes, titles.items()):
        part = calibration[name]
        curve = part["reliability"]
        accuracy = [a if a is not None else 0.0 for a in curve["accuracy"]]
        gap = [(c - a) if c is not None else 0.0 for c, a in zip(curve["confidence"], accuracy)]
        ax.bar(centres, accuracy, width=width, color=PALETTE[0], edgecolor="white", label="accuracy")
        ax.bar(centres, gap, bottom=accuracy, width=width, color=PALETTE[1], alpha=0.35, edgecolor=PALETTE[1], label="gap to confidence")
        ax.plot([0, 1], [0, 1], color="0.3", linestyle="--", linewidth=1)
        ax.set(title=f"{title}: ECE {part['ece']:.3f}", xlabel="confidence", xlim=(0, 1), ylim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=8, loc="upper left")
    return fig
