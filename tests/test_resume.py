"""Kill and resume: `graft train` SIGKILLed after a checkpoint, then `--resume`d, ends where an
uninterrupted run ends (CPU, same seed); nothing half-written is ever presented as a result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import graft
from graft.errors import ConfigError
from graft.training.checkpoint import CHECKPOINT_DIR, read_checkpoint

RUN_FILES = ("config.json", "split.json", "history.jsonl", "metrics.json", "val_predictions.json", "report.html")


def _graft(*args: object) -> list[str]:
    return [sys.executable, "-m", "graft.cli.main", *map(str, args)]


def _run(*args: object) -> subprocess.CompletedProcess:
    result = subprocess.run(_graft(*args), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def _kill_after_first_checkpoint(args: list[object], out: Path) -> None:
    """Start `graft train`, SIGKILL it as soon as its first checkpoint is on disk."""
    process = subprocess.Popen(_graft(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while not (out / CHECKPOINT_DIR / "state.json").is_file():
            if process.poll() is not None:
                raise AssertionError(f"graft train ended before its first checkpoint:\n{process.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise AssertionError("no checkpoint appeared in time")
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed; give it more epochs"


def _assert_nothing_partial_is_presented(out: Path) -> None:
    """Only whole files under their real names; temporaries are hidden (leading '.')."""
    assert not (out / "metrics.json").exists() and not (out / "bundle").exists()
    for path in out.iterdir():
        if path.name.endswith((".tmp", ".old")):
            assert path.name.startswith("."), path
    for line in (out / "history.jsonl").read_text().splitlines():
        json.loads(line)  # every line whole
    meta, _ = read_checkpoint(out / CHECKPOINT_DIR)
    assert meta["epoch"] >= 0


def _same_result(resumed: Path, uninterrupted: Path) -> None:
    a = json.loads((resumed / "metrics.json").read_text())
    b = json.loads((uninterrupted / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "confusion_matrix", "best_epoch", "epochs_run"):
        assert a[key] == b[key], key

    def val_losses(run: Path) -> list[tuple[int, float, float, str | None]]:
        rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
        return [(r["epoch"], r["val_loss"], r["train_loss"], r.get("stage_thawed")) for r in rows]

    assert val_losses(resumed) == val_losses(uninterrupted)
    assert json.loads((resumed / "val_predictions.json").read_text()) == json.loads((uninterrupted / "val_predictions.json").read_text())
    assert not (resumed / CHECKPOINT_DIR).exists(), "the checkpoint is removed once the run is done"
    assert not [p for p in resumed.iterdir() if p.name.startswith(".")], "no temporaries left"
    assert graft.load_bundle(resumed / "bundle").class_names == a["class_names"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        # Head on cached features: epochs are milliseconds, so many of them (no early stop).
        ["--strategy", "feature-extract", "--epochs", "100", "--patience", "100"],
        # Images through the network, the last stage thawed in epoch 2: RNG, augmentation, thaw stage.
        ["--strategy", "gradual", "--epochs", "2"],
    ],
    ids=["feature-extract", "gradual"],
)
def test_killed_run_resumes_to_the_uninterrupted_result(fashion_folder, tmp_path, options):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    _kill_after_first_checkpoint(["train", fashion_folder, "--out", killed, "--quiet", *options], killed)
    _assert_nothing_partial_is_presented(killed)
    checkpointed, _ = read_checkpoint(killed / CHECKPOINT_DIR)
    _run("train", fashion_folder, "--out", killed, "--quiet", "--resume", *options)
    # It continued, not started over: the epochs before the kill keep their measured times.
    resumed = [json.loads(line) for line in (killed / "history.jsonl").read_text().splitlines()]
    assert resumed[: len(checkpointed["history"])] == checkpointed["history"]
    _run("train", fashion_folder, "--out", whole, "--quiet", *options)
    _same_result(killed, whole)


def test_resume_refuses_changed_options_and_missing_runs(fashion_folder, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="no run to continue"):
        graft.train(fashion_folder, strategy="feature-extract", out=out, resume=True, verbose=False)
    graft.train(fashion_folder, strategy="feature-extract", out=out, epochs=3, verbose=False)
    with pytest.raises(ConfigError, match=r"--epochs was 3, now 5.*--lr was None, now 0\.01"):
        graft.train(fashion_folder, strategy="feature-extract", out=out, epochs=5, lr=0.01, resume=True, verbose=False)
    with pytest.raises(ConfigError, match="finished already"):
        graft.train(fashion_folder, strategy="feature-extract", out=out, epochs=3, resume=True, verbose=False)


def test_resume_names_the_data_that_changed(fashion_folder, tmp_path):
    import shutil

    from graft.errors import DataError

    data, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(fashion_folder, data)
    options = ["--strategy", "feature-extract", "--epochs", "100", "--patience", "100"]
    _kill_after_first_checkpoint(["train", data, "--out", out, "--quiet", *options], out)
    resume = dict(strategy="feature-extract", epochs=100, patience=100, resume=True, verbose=False)
    first_class = sorted(p.name for p in data.iterdir())[0]
    shutil.copytree(data / first_class, data / "coat")
    with pytest.raises(DataError, match=r"changed since the run .* started \(classes added: coat; \d+ images added"):
        graft.train(data, out=out, **resume)
    shutil.rmtree(data / "coat")
    gone = sorted((data / first_class).iterdir())[0]
    gone.unlink()
    with pytest.raises(DataError, match=rf"image removed \({first_class}/{gone.name}\)"):
        graft.train(data, out=out, **resume)


def test_checkpoint_of_a_newer_format_is_refused(tmp_path):
    folder = tmp_path / CHECKPOINT_DIR
    folder.mkdir()
    (folder / "state.json").write_text(json.dumps({"format_version": 99}))
    from safetensors.torch import save_file
    import torch

    save_file({"x": torch.zeros(1)}, str(folder / "tensors.safetensors"))
    with pytest.raises(ConfigError, match="format 99"):
        read_checkpoint(folder)


def test_early_stopped_checkpoint_stops_at_once():
    """Resuming after the epoch that triggered early stopping trains no further epoch."""
    import torch

    from graft.training.loop import EpochRecord, fit

    history = [EpochRecord(e, 1.0, 0.5, 1.0, 0.5, [0.1], 0.0) for e in range(4)]
    calls = []
    model = torch.nn.Linear(2, 2)
    result = fit(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_epoch=lambda e: calls.append(e) or (0.0, 0.0), validate=lambda: (0.0, 0.0),
        epochs=10, patience=3, start_epoch=4, history=history, best=(0, 0.5, 1.0, {}),
    )
    assert calls == [] and result.stopped_early and result.best_epoch == 0


def test_a_checkpoint_set_aside_mid_rename_is_used(tmp_path):
    """Killed between atomic_dir's two renames: no checkpoint/ but a complete `.checkpoint.*.old`."""
    import torch

    from graft.training.checkpoint import remove_temporaries, write_checkpoint

    write_checkpoint(tmp_path / CHECKPOINT_DIR, {"format_version": 1, "epoch": 4}, {"x": torch.arange(3)})
    (tmp_path / CHECKPOINT_DIR).rename(tmp_path / f".{CHECKPOINT_DIR}.0123abcd.old")
    (tmp_path / ".history.jsonl.89abcdef.tmp").write_text("half a li")
    remove_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f".{CHECKPOINT_DIR}.0123abcd.old"]
    meta, tensors = read_checkpoint(tmp_path / CHECKPOINT_DIR)
    assert meta["epoch"] == 4 and tensors["x"].tolist() == [0, 1, 2]
