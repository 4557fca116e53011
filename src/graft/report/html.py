"""`report.html`: one self-contained page that shows what a run's transfer did.

Everything is read back from the run folder (config.json, metrics.json, history.jsonl,
split.json, val_predictions.json, bundle/), so a report can be rebuilt for any finished run with
`write_report(run_dir)`. Figures are embedded as base64 PNGs: the page needs no network, no
JavaScript and no other file. A multi-label run's page (`MULTILABEL_SECTIONS`) has the sections of
`graft.report.multilabel` in place of those that read one label per image.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from graft.atomic import write_json, write_text
from graft.config import TrainConfig
from graft.errors import BundleError, ImageError
from graft.input.images import load_image
from graft.models.backbones import load_backbone
from graft.models.stages import discover_stages
from graft.report.activations import feature_maps_figure
from graft.report.forgetting import MAX_CKA_IMAGES, stage_forgetting
from graft.report.multilabel import (
    CURVE_SCORES, LABEL_SET_SECTIONS, is_multilabel, label_counts, multilabel_cards, multilabel_sections,
)
from graft.report.parts import esc, fmt, gallery, img, note, page, scope_note, section, table, thumbnail
from graft.shipping.bundle import load_bundle
from graft.strategies import STRATEGY_NAMES, get_strategy
from graft.strategies.auto_measure import describe_framing, describe_pooling

# The report's sections, in page order: (id, heading). Tests and readers rely on these ids.
SECTIONS: tuple[tuple[str, str], ...] = (
    ("data", "Data"),
    ("data-check", "Data check: likely wrong labels, leaks, odd images"),
    ("strategy", "Strategy and what it trains"),
    ("curves", "Learning curves"),
    ("confusion", "Confusion matrix"),
    ("per-class", "Per-class precision, recall and F1"),
    ("calibration", "Calibration"),
    ("mistakes", "Most confidently wrong validation images"),
    ("filters", "First-layer filters"),
    ("feature-maps", "Feature maps"),
    ("forgetting", "Forgetting per stage"),
)
# A label-set run's page: the single-label sections give way to `graft.report.multilabel`'s.
MULTILABEL_SECTIONS: tuple[tuple[str, str], ...] = (
    *(s for s in SECTIONS if s[0] in ("data", "data-check", "strategy", "curves")),
    *LABEL_SET_SECTIONS,
    *(s for s in SECTIONS if s[0] in ("filters", "feature-maps", "forgetting")),
)
MAX_MISTAKES = 12
MAX_CHECK_THUMBNAILS = 12
MAX_CHECK_ROWS = 40
REPORT_FEATURE_STAGES = 4  # rows of feature maps in the report; show-features draws any others


# --- reading the run back -----------------------------------------------------------------------


class Run:
    """The files of a finished run folder, read once."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        self.metrics: dict[str, Any] = self._json("metrics.json")
        self.config: dict[str, Any] = self._json("config.json")
        self.split: dict[str, Any] = self._json("split.json", default={})
        self.predictions: list[dict[str, Any]] = self._json("val_predictions.json", default=[])
        history_path = run_dir / "history.jsonl"
        self.history = [json.loads(line) for line in history_path.read_text(encoding="utf-8").splitlines() if line.strip()] if history_path.is_file() else []
        self.data_root = Path(self.metrics.get("data", {}).get("root") or self.config.get("data", "."))

    def _json(self, name: str, default: Any = None) -> Any:
        path = self.dir / name
        if not path.is_file():
            if default is not None:
                return default
            raise BundleError(f"{path}: missing; the report is built from a finished run folder (run `graft train` first)")
        return json.loads(path.read_text(encoding="utf-8"))

    def val_images(self, limit: int) -> list[tuple[Path, str]]:
        """Up to `limit` validation images that exist, taken round-robin over the classes."""
        by_class: dict[str, list[Path]] = {}
        for relative, label in self.split.get("val", []):
            path = self.data_root / relative
            by_class.setdefault(label, []).append(path)
        chosen: list[tuple[Path, str]] = []
        queues = [list(paths) for paths in by_class.values()]
        labels = list(by_class)
        while len(chosen) < limit and any(queues):
            for label, queue in zip(labels, queues):
                if queue and len(chosen) < limit:
                    path = queue.pop(0)
                    if path.is_file():
                        chosen.append((path, label))
        return chosen


def load_batch(paths: Sequence[Path], transform: Any, min_size: int | None = None) -> torch.Tensor:
    """Preprocessed images (n, 3, H, W), decoded no larger than `min_size` needs (`load_image`);
    unreadable files are skipped (they were reported in training)."""

    tensors = []
    for path in paths:
        try:
            tensors.append(transform(load_image(path, min_size=min_size)))
        except ImageError:
            continue
    return torch.stack(tensors) if tensors else torch.empty(0)


def first_conv_weight(model: torch.nn.Module) -> tuple[str, torch.Tensor] | None:
    """The first 2-D convolution that reads the image (name, weight), or None (a ViT's patch embed counts)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d) and module.in_channels in (1, 3):
            return name, module.weight.detach().float().cpu()
    return None


# --- the report ---------------------------------------------------------------------------------


def write_report(run_dir: str | Path, *, cka_images: int | None = None) -> Path:
    """Build `report.html` (and `forgetting.json`) for a finished run folder; returns the page's path.

    Loads the run's bundle and the pretrained backbone it started from, measures forgetting per
    stage on up to `cka_images` (default 64) validation images, draws the figures, and writes the
    page atomically. Typically a few seconds on a CPU; a feature-extract run needs no forward pass
    for CKA because its backbone is bit-identical to the pretrained one.

    >>> write_report("runs/birds")  # doctest: +SKIP
    PosixPath('runs/birds/report.html')
    """
    from graft.report import figures  # matplotlib loads only when a figure is drawn

    started = time.perf_counter()
    run_dir = Path(run_dir)
    run = Run(run_dir)
    bundle = load_bundle(run_dir / "bundle")
    pretrained = load_backbone(bundle.meta["backbone"]["name"], weights=run.config.get("weights"))
    stages = discover_stages(pretrained.model)

    val_images = run.val_images(min(cka_images or MAX_CKA_IMAGES, MAX_CKA_IMAGES))
    loaded: list[int] = []

    def batch() -> torch.Tensor:
        # Only called when some stage changed: a feature-extract run never decodes these images.
        images = load_batch([path for path, _ in val_images], bundle.transform, bundle.preprocessing.resize_size)
        loaded.append(len(images))
        return images

    forgetting = [row.to_dict() for row in stage_forgetting(bundle.model.backbone, pretrained.model, batch, stages=stages)]
    num_images = loaded[0] if loaded else 0
    write_json(run_dir / "forgetting.json", {"images": num_images, "stages": forgetting})

    multilabel = is_multilabel(run.metrics)
    parts = [
        header(run),
        section("data", "Data", data_section(run)),
        section("data-check", "Data check: likely wrong labels, leaks, odd images", data_check_section(run, figures)),
        section("strategy", "Strategy and what it trains", strategy_section(run, bundle, pretrained, stages)),
        section("curves", "Learning curves", curves_section(run, figures)),
        *(multilabel_sections(run, figures) if multilabel else single_label_sections(run, figures)),
        section("filters", "First-layer filters", filters_section(bundle.model.backbone, pretrained.model, figures)),
        section("feature-maps", "Feature maps", feature_maps_section(bundle, val_images, "labels" if multilabel else "class")),
        section("forgetting", "Forgetting per stage", forgetting_section(forgetting, num_images, figures)),
        note(f"Report built by graft in {time.perf_counter() - started:.1f} s from {run_dir}."),
    ]
    out = run_dir / "report.html"
    write_text(out, page(f"graft report: {run_dir.name}", "\n".join(parts)))
    return out


def single_label_sections(run: Run, figures: Any) -> list[str]:
    """The sections that read one label per image: confusion matrix, per-class scores,
    calibration of the softmax, the most confidently wrong images."""
    return [
        section("confusion", "Confusion matrix", img(
            figures.figure_uri(figures.confusion_matrix(run.metrics["confusion_matrix"], run.metrics["class_names"])),
            "confusion matrix", "rows: true class; columns: predicted class; shading: fraction of the row",
        )),
        section("per-class", "Per-class precision, recall and F1", per_class_section(run)),
        section("calibration", "Calibration", calibration_section(run, figures)),
        section("mistakes", "Most confidently wrong validation images", mistakes_section(run, figures)),
    ]


def _macro_f1_scope(metrics: Mapping[str, Any]) -> str:
    """A note such as `(over 2 of 3 classes)` when macro-F1 averages fewer than all the classes."""
    names = metrics.get("class_names", [])
    return scope_note(len(metrics.get("macro_f1_classes", names)), len(names), "classes")


def header(run: Run) -> str:
    m = run.metrics
    scores = multilabel_cards(m) if is_multilabel(m) else [
        ("validation accuracy", f"{m['accuracy']:.3f}"),
        ("macro-F1", f"{m['macro_f1']:.3f}" + _macro_f1_scope(m)),
    ]
    cards = [
        *scores,
        ("strategy", _strategy_card(m)),
        ("backbone", m.get("backbone", "?")),
        ("trainable / total params", f"{m.get('trainable_params', 0):,} / {m.get('total_params', 0):,}"),
        ("training time", f"{m.get('train_seconds', 0):.1f} s"),
    ]
    card_html = "".join(f'<div class="card">{esc(label)}<b>{esc(value)}</b></div>' for label, value in cards)
    return (
        f"<header><h1>graft run: {esc(run.dir.name)}</h1>"
        f'<p class="lead">{esc(m.get("num_train", "?"))} training and {esc(m.get("num_val", "?"))} validation images '
        f"from {esc(run.data_root)}</p><div class=\"cards\">{card_html}</div></header>"
    )


def data_section(run: Run) -> str:
    """Images per class (label-set runs: per label), the split, bad images skipped, data warnings."""
    data = run.metrics.get("data", {})
    counts = label_counts(run.metrics) if is_multilabel(run.metrics) else class_counts(run.metrics)
    bad = data.get("bad_images", [])
    if bad:
        bad_html = f'<p class="bad">{len(bad)} bad image(s) skipped:</p>' + table(["file", "reason"], [(b["path"], b["reason"]) for b in bad])
    else:
        bad_html = "<p>Bad images skipped: none.</p>"
    warnings = "".join(f'<p class="bad">warning: {esc(w)}</p>' for w in data.get("warnings", []))
    return counts + bad_html + warnings


def class_counts(metrics: Mapping[str, Any]) -> str:
    """Training and validation images per class, the split and the imbalance."""
    data = metrics.get("data", {})
    train_counts: Mapping[str, int] = data.get("train_per_class", {})
    val_counts: Mapping[str, int] = data.get("val_per_class", {})
    names = metrics["class_names"]
    rows = [(name, train_counts.get(name, 0), val_counts.get(name, 0)) for name in names]
    rows.append(("total", sum(train_counts.values()), sum(val_counts.values())))
    ratio = data.get("imbalance_ratio")
    summary = (
        f"<p>{len(names)} classes; split: {esc(data.get('split', '?'))} (seed {esc(data.get('seed', '?'))}). "
        f"Imbalance (largest / smallest training class): <b>{esc(fmt(ratio, 2))}</b>"
        + (" — consider --class-weighting balanced." if isinstance(ratio, (int, float)) and ratio >= 3 else ".")
        + "</p>"
    )
    return summary + table(["class", "training images", "validation images"], rows)


def data_check_section(run: Run, figures: Any) -> str:
    """The run's data check (data_check.json): counts, notes, thumbnails of the flagged images, the list."""

    path = run.dir / "data_check.json"
    if not path.is_file():
        return note("The data check did not run (--no-check-data); `graft check DATA` runs it on its own.")
    checked = json.loads(path.read_text(encoding="utf-8"))
    findings = checked.get("findings", [])
    counts = ", ".join(f"{n} {issue}" for issue, n in checked.get("counts", {}).items()) or "no issue found"
    intro = f"<p>{esc(checked.get('images', '?'))} images checked: <b>{esc(counts)}</b>. The full list is data_check.csv.</p>"
    intro += "".join(note(f"note: {n}") for n in checked.get("notes", []))
    tiles = []
    pictures = [f for f in findings if f["issue"] not in ("small-class", "imbalanced", "unreadable")]  # rows of one image
    for row in pictures[:MAX_CHECK_THUMBNAILS]:
        try:
            uri = figures.image_uri(load_image(run.data_root / row["path"]), max_side=160)
        except ImageError:
            continue  # moved or removed since; the table still lists it
        suggestion = f"<br>suggested <b>{esc(row['suggested_label'])}</b>" if row["suggested_label"] else ""
        tiles.append(
            f'<figure><img src="{uri}" alt="{esc(row["path"])}"><figcaption><b class="bad">{esc(row["issue"])}</b> '
            f"({row['score']:.2f}){suggestion}<br>{esc(row['path'])}</figcaption></figure>"
        )
    listing = table(
        ["path", "issue", "score", "suggested label", "detail"],
        [(f["path"], f["issue"], f"{f['score']:.3f}", f["suggested_label"], f["detail"]) for f in findings[:MAX_CHECK_ROWS]],
    ) if findings else ""
    more = note(f"and {len(findings) - MAX_CHECK_ROWS} more rows in data_check.csv") if len(findings) > MAX_CHECK_ROWS else ""
    gallery = f'<div class="gallery">{"".join(tiles)}</div>' if tiles else ""
    return intro + gallery + listing + more + note("What each issue means and how it is found: docs/check.md.")


def _strategy_card(metrics: Mapping[str, Any]) -> str:
    """The strategy, and for auto the one it kept: "auto: feature-extract"."""
    auto = metrics.get("auto") or {}
    kept = auto.get("kept") or auto.get("chose")
    return f"auto: {kept}" if kept else str(metrics.get("strategy", "?"))


def strategy_section(run: Run, bundle: Any, pretrained: Any, stages: Sequence[Any]) -> str:

    if "audit" in (run.metrics.get("auto") or {}):
        return auto_section(run.metrics["auto"])
    name = run.metrics.get("strategy") or run.config.get("strategy")
    settings = {k: v for k, v in run.config.items() if k not in ("data", "out", "resolved")}
    intro = f"<p>Strategy <b>{esc(name)}</b>. Settings: " + ", ".join(f"{esc(k)}={esc(v)}" for k, v in settings.items()) + ".</p>"
    if name not in STRATEGY_NAMES:
        return intro + note(f"the audit is not available: strategy {name!r} is not known to this graft version")
    try:
        config = TrainConfig.from_dict({k: v for k, v in run.config.items() if k != "resolved"})
        # The audit describes the run's start: the pretrained backbone with the trained head.
        rows = get_strategy(name).audit(pretrained.model, list(stages), bundle.model.head, config)
    except Exception as error:  # a strategy's audit must not cost the rest of the report
        return intro + note(f"the audit could not be computed: {error}")
    body = table(
        ["stage", "trainable params", "total params", "learning rate", "BatchNorm"],
        [(r.stage, f"{r.trainable_params:,}", f"{r.total_params:,}", f"{r.lr:.2g}" if r.lr else "-", r.bn_mode) for r in rows],
    )
    return intro + body + note("BatchNorm \"eval\": running statistics frozen to the pretrained ones.")


def auto_section(auto: Mapping[str, Any]) -> str:
    """What `auto` measured, chose and kept, and why; the kept strategy's audit and settings: all
    as recorded in `metrics.json: auto` while the run trained."""
    settings = auto.get("settings", {})
    kept = auto.get("kept", auto["chose"])
    intro = (f"<p>Strategy <b>auto</b> measured the data and kept <b>{esc(kept)}</b> "
             f"({esc(settings.get('pooling', '?'))} pooling, crop {esc(_number(settings.get('crop_pct')))}).</p>")
    why = [f"Rule ({auto['rule']}): {auto['reason']}"]
    if auto.get("framing"):
        why.append(describe_framing(auto["framing"]).removeprefix("auto "))
    if auto.get("pooling"):
        why.append(describe_pooling(auto["pooling"]).removeprefix("auto "))
    if auto.get("decision"):
        why.append(f"kept: {auto['decision']['why']}.")
    measured = ", ".join(f"{k.replace('_', ' ')} {_number(v)}" for k, v in auto.get("measured", {}).items())
    measure = auto.get("measure", "accuracy")  # label-ranking AP for label sets
    candidates = table(
        ["measured", "candidate", f"validation {measure}", "standard error", "validation log-loss", "chosen"],
        [(c["kind"], c["name"], fmt(c["accuracy"]), fmt(c.get("standard_error")), fmt(c.get("loss")),
          "yes" if c.get("chosen") else "") for c in auto.get("candidates", [])],
    )
    audit = table(
        ["stage", "trainable params", "total params", "learning rate", "BatchNorm"],
        [(r["stage"], f"{r['trainable_params']:,}", f"{r['total_params']:,}", f"{r['lr']:.2g}" if r["lr"] else "-", r["bn_mode"])
         for r in auto["audit"]],
    )
    shown = ", ".join(f"{esc(k)}={esc('default' if v is None else v)}" for k, v in settings.items())
    return (
        intro + f"<p>Measured on the training images: {esc(measured)}.</p>"
        + "<p>Every candidate scored on the validation images (probes on the frozen features for the framing "
        + "and the pooling; the trained models for the strategies):</p>" + candidates
        + "<ul>" + "".join(f"<li>{esc(line)}</li>" for line in why) + "</ul>"
        + f"<p>What {esc(kept)} trained:</p>" + audit
        + note("BatchNorm \"eval\": running statistics frozen to the pretrained ones.")
        + f"<p>Settings {esc(kept)} trained with: {shown}.</p>"
    )


def _number(value: Any) -> str:
    """A measured figure as short as it reads: 20 images per class, confidence 0.252."""
    return f"{value:.3g}" if isinstance(value, float) else fmt(value)


def curves_section(run: Run, figures: Any) -> str:
    if not run.history:
        return note("history.jsonl is empty: no epoch was recorded.")
    thawed = [(row["epoch"] + 1, row["stage_thawed"]) for row in run.history if row.get("stage_thawed")]
    score = CURVE_SCORES if is_multilabel(run.metrics) else ("accuracy", "train", "validation")
    fig = figures.learning_curves(run.history, run.metrics.get("best_epoch"), score=score)
    best_epoch = run.metrics.get("best_epoch") or 0
    caption = f"{len(run.history)} epochs; " + (f"best epoch {fmt(best_epoch + 1)} (green line)" if best_epoch >= 0 else
                                                 "no epoch beat the probe training started from on validation: the probe was kept")
    if thawed:
        caption += "; dashed lines: " + ", ".join(f"epoch {e} thawed {s}" for e, s in thawed)
    else:
        caption += "; no stage was thawed during training"
    return img(figures.figure_uri(fig), "learning curves", caption)


def per_class_section(run: Run) -> str:
    per_class = run.metrics.get("per_class", {})
    rows = [
        (name, fmt(v.get("precision")), fmt(v.get("recall")), fmt(v.get("f1")), v.get("support", ""))
        for name, v in per_class.items()
    ]
    return table(["class", "precision", "recall", "F1", "support"], rows)


def calibration_section(run: Run, figures: Any) -> str:
    """The reliability diagram on validation before and after the temperature, with the measures."""
    calibration = run.metrics.get("calibration")
    if not calibration:
        return note("metrics.json has no calibration: this run's scores are not calibrated (temperature 1).")
    before, after = calibration["before"], calibration["after"]
    measures = table(
        ["validation", "ECE (15 bins)", "NLL", "Brier"],
        [(name, fmt(part["ece"]), fmt(part["nll"]), fmt(part["brier"])) for name, part in (("before", before), ("after", after))],
    )
    test = run.metrics.get("test", {})
    held_out = f" On the held-out test/ folder, calibrated: ECE {fmt(test['ece'])}." if "ece" in test else ""
    caption = (f"bars: accuracy of the validation images in each confidence bin; dashed: perfect calibration. "
               f"Scores are divided by the temperature {calibration['temperature']:.3g} fitted on validation "
               f"(predict, evaluate, serve and ONNX all use it), so 'after' on validation is optimistic.{held_out}")
    return img(figures.figure_uri(figures.reliability_diagram(calibration)), "reliability diagram", caption) + measures


def mistakes_section(run: Run, figures: Any) -> str:

    wrong = sorted((r for r in run.predictions if r["label"] != r["true"]), key=lambda r: -r["score"])
    if not run.predictions:
        return note("val_predictions.json is missing: no per-image predictions to show.")
    if not wrong:
        return "<p>Every validation image was classified correctly.</p>"
    tiles = [
        thumbnail(run.data_root / row["path"], row["path"], figures=figures, caption=(
            f"true <b>{esc(row['true'])}</b><br>predicted <b class=\"bad\">{esc(row['label'])}</b> ({row['score']:.2f})"
        ))
        for row in wrong[:MAX_MISTAKES]
    ]  # a data folder moved since training loses its tiles; the table below still lists them
    listing = table(
        ["image", "true", "predicted", "score", "score of the true class"],
        [(r["path"], r["true"], r["label"], f"{r['score']:.3f}", f"{r['true_score']:.3f}") for r in wrong[:MAX_MISTAKES]],
    )
    return f"<p>{len(wrong)} of {len(run.predictions)} validation images are wrong; the {min(len(wrong), MAX_MISTAKES)} most confident:</p>" + gallery(tiles) + listing


def filters_section(trained: torch.nn.Module, pretrained: torch.nn.Module, figures: Any) -> str:
    before, after = first_conv_weight(pretrained), first_conv_weight(trained)
    if before is None or after is None or before[1].shape != after[1].shape:
        return note("this backbone has no first convolution over the image to draw")
    name, weight = before
    fig = figures.first_layer_filters(before[1].numpy(), after[1].numpy())
    moved = float(torch.linalg.norm(after[1] - weight) / torch.linalg.norm(weight))
    return img(
        figures.figure_uri(fig), "first-layer filters before and after training",
        f"{name}: {weight.shape[0]} kernels of {weight.shape[2]}x{weight.shape[3]} (RGB), grey = 0, same scale before and after; "
        f"relative change {moved:.3g}",
    )


def feature_maps_section(bundle: Any, val_images: Sequence[tuple[Path, str]], truth: str = "class") -> str:
    """One validation image through the trained backbone; `truth` names what its label is
    ("class", or "labels" for a label set joined by ';')."""
    from graft.report.figures import figure_uri  # matplotlib loads only when a figure is drawn

    if not val_images:
        return note("no validation image could be read to show feature maps for")
    path, label = val_images[0]
    picture = load_image(path, min_size=bundle.preprocessing.resize_size)  # a phone photo at the model's size
    fig = feature_maps_figure(bundle, picture, stages=spread_stages(bundle.model.backbone, REPORT_FEATURE_STAGES))
    return img(
        figure_uri(fig), f"feature maps of {path.name}",
        f"{path.name} (true {truth} {label or 'none'}) through the trained backbone: per stage, the most active channels. "
        f"Other images and stages: graft show-features BUNDLE IMAGE --stages 0,3,-1 --out maps.png",
    )


def spread_stages(backbone: torch.nn.Module, count: int) -> list[int]:
    """`count` stage indices spread from the first to the last stage (the report's feature maps)."""

    total = len(discover_stages(backbone))
    if total <= count:
        return list(range(total))
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def forgetting_section(rows: Sequence[Mapping[str, Any]], num_images: int, figures: Any) -> str:
    if num_images:
        measured = f"on {num_images} validation images"
    else:
        measured = "(every stage is bit-identical to the pretrained one, so its outputs are too: CKA 1 without a forward pass)"
    chart = img(
        figures.figure_uri(figures.forgetting_chart({"this run": rows})), "forgetting per stage",
        f"left: how far each stage's weights moved from the pretrained ones; right: linear CKA between the stage's "
        f"outputs in the trained and the pretrained backbone {measured}",
    )
    listing = table(
        ["stage", "params", "weight drift", "linear CKA", "identical to pretrained"],
        [(f"{r['index']}: {r['name']}", f"{r['num_params']:,}", fmt(r["drift"], 4), fmt(r["cka"], 4), "yes" if r["unchanged"] else "no") for r in rows],
    )
    return chart + listing + note("definitions: docs/report.md. Drift 0 and CKA 1: the stage is exactly the pretrained one.")
