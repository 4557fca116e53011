"""Batch prediction into a CSV file: any number of images, streamed, resumable.

Each prediction is written as one whole CSV line and flushed as soon as its batch is done, so a
run that is killed leaves every finished line in the file and at most one partial line at its
end. Run the same command again and it drops that partial line, skips every image already in the
file and appends the rest.

    path,label,score,top_k,error
    photos/a.jpg,robin,0.981234,robin:0.9812;wren:0.0101,
    photos/b.jpg,,,,the image data is damaged or truncated (...)

Unreadable images get a row with the reason in `error` (so the file accounts for every image and
a resumed run does not retry them; delete those rows to retry).

>>> result = predict_to_csv("runs/birds/bundle", ["photos/"], "predictions.csv")
>>> result.written, result.skipped, result.failed
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from graft.api import expand_image_paths
from graft.console import QUIET, Reporter
from graft.errors import ConfigError, ImageError
from graft.ranges import BATCH_SIZE, TOP_K, check_number
from graft.shipping.bundle import Bundle, Prediction, load_bundle
from graft.shipping.multilabel import LabelSetPrediction

CSV_COLUMNS = ("path", "label", "score", "top_k", "error")


@dataclass(frozen=True)
class BatchResult:
    """What one `predict_to_csv` call did."""

    out: Path
    total: int  # images found
    skipped: int  # already in the output file (resumed)
    written: int  # predictions appended by this call
    failed: list[ImageError]  # unreadable images (appended with their reason)


def predict_to_csv(
    bundle: Bundle | str | Path,
    paths: Iterable[str | Path],
    out: str | Path,
    *,
    top_k: int = 3,
    batch_size: int = 32,
    reporter: Reporter = QUIET,
    threshold: float | None = None,
    unknown: str = "auto",
) -> BatchResult:
    """Predict every image under `paths` into the CSV `out`, appending to it and resuming.

    Images whose path is already in `out` are skipped; a trailing partial line (from a killed
    run) is removed first. Missing parent folders of `out` are created. Progress is shown by
    `reporter` (a rich bar on stderr in the CLI). A multi-label bundle's `label` column holds the
    image's label set joined by ';' (at its thresholds, or `threshold`), `score` the best label's score.
    `unknown` as `Bundle.predict`'s: the label
    is "unknown" past the bundle's threshold (the file keeps its columns; no unknown_score).
    """

    check_number("top_k", top_k, TOP_K)
    check_number("batch_size", batch_size, BATCH_SIZE)
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out: {out} is a folder; give a CSV file name such as {out / 'predictions.csv'}")
    model = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    done = _finished_paths(out)
    # Listing paths is cheap even for millions of files, and gives the progress bar its total.
    every = [str(path) for path in expand_image_paths(paths)]
    todo = [path for path in every if _key(path) not in done]
    skipped = len(every) - len(todo)
    if skipped:
        reporter.say(f"{out}: {skipped} of {len(every)} images already predicted, resuming with {len(todo)}")
    failed: list[ImageError] = []
    written = 0
    with _open_for_append(out, reporter) as handle:
        if handle.tell() == 0:
            _write_row(handle, CSV_COLUMNS)
        with reporter.progress("predicting", total=len(todo)) as advance:

            def on_error(error: ImageError) -> None:
                failed.append(error)
                _write_row(handle, (error.path, "", "", "", error.reason))
                advance(1, status=f"{len(failed)} unreadable")

            for prediction in model.iter_predict(todo, top_k=top_k, batch_size=batch_size, on_error=on_error, threshold=threshold, unknown=unknown):
                _write_row(handle, _prediction_row(prediction))
                written += 1
                advance(1)
            os.fsync(handle.fileno())
    return BatchResult(out=out, total=len(every), skipped=skipped, written=written, failed=failed)


def _open_for_append(out: Path, reporter: Reporter) -> io.TextIOWrapper:
    """`out` opened to append, its missing parent folders created (as `train --out` does)."""
    missing = not out.parent.exists()
    blocking = next((folder for folder in out.parents if folder.exists() and not folder.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"--out: {blocking} is a file, not a folder, so {out} cannot be written there; give another path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        handle = out.open("a", encoding="utf-8", newline="")
    except OSError as error:
        raise ConfigError(
            f"--out: cannot write {out} ({error.strerror or error}); give a file in a folder you can write to"
        ) from None
    if missing:
        reporter.say(f"created the folder {out.parent} for {out.name}")
    return handle


def read_predictions(path: str | Path) -> list[dict[str, str]]:
    """The whole rows of a predictions CSV (a trailing partial line is ignored)."""
    path = Path(path)
    text = path.read_bytes().decode("utf-8")
    whole = text[: text.rfind("\n") + 1]
    return list(csv.DictReader(io.StringIO(whole, newline="")))


def _prediction_row(prediction: Prediction | LabelSetPrediction) -> tuple[str, ...]:
    top = ";".join(f"{label}:{score:.4f}" for label, score in prediction.top_k)
    label = ";".join(name for name, _ in prediction.labels) if isinstance(prediction, LabelSetPrediction) else prediction.label
    return (prediction.path, label, f"{prediction.score:.6f}", top, "")


def _write_row(handle: io.TextIOBase, row: Iterable[str]) -> None:
    # Format the line first and write it in one call, then flush: a kill leaves whole lines.
    line = io.StringIO()
    csv.writer(line, lineterminator="\n").writerow(row)
    handle.write(line.getvalue())
    handle.flush()


def _key(path: str) -> str:
    return os.path.abspath(path)


def _finished_paths(out: Path) -> set[str]:
    """Paths already in `out`; cuts a trailing partial line off the file (a killed run's)."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with out.open("r+b") as handle:
            handle.truncate(end)
        data = data[:end]
    if not data:
        return set()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"--out: {out} is not a UTF-8 CSV; give a new file name or the predictions CSV to resume") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, [])
    if tuple(header) != CSV_COLUMNS:
        raise ConfigError(
            f"--out: {out} exists but is not a graft predictions CSV (its header is {','.join(header)!r}, "
            f"expected {','.join(CSV_COLUMNS)!r}); give a new file name, or delete it"
        )
    return {_key(row[0]) for row in reader if row}
