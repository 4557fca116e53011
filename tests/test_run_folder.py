"""Folders graft writes: it removes only what its manifest proves it wrote, never mixes two runs,
and a folder it cannot write is one `graft: error:` line naming it."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import graft
from graft.errors import OutputError
from graft.run_folder import claim_folder, read_manifest, remove_owned
from test_resume import _kill_after_first_checkpoint


def _graft(*args: object, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "graft.cli.main", *map(str, args)], capture_output=True, text=True, timeout=600, **kwargs
    )


def _one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graft: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_out_holding_files_graft_did_not_write_is_refused_untouched(fashion_folder, tmp_path):
    project = tmp_path / "proj"
    (project / "checkpoint").mkdir(parents=True)
    (project / "bundle").mkdir()
    (project / "checkpoint" / "epoch_99.pt").write_text("x")
    (project / "bundle" / "app.js").write_text("x")
    before = _tree(project)
    for extra in ([], ["--overwrite"]):
        result = _graft("train", fashion_folder, "--out", project, "--epochs", "1", *extra)
        _one_error_line(result, f"--out {project}", "not empty", "choose a new or empty folder")
        assert _tree(project) == before
    # A data folder with classes named like a run's folders, given as --out: its images stay.
    data = tmp_path / "data"
    for name in ("bundle", "checkpoint"):
        shutil.copytree(fashion_folder / sorted(p.name for p in fashion_folder.iterdir())[0], data / name)
    images = _tree(data)
    with pytest.raises(OutputError, match="not empty"):
        graft.train(data, strategy="feature-extract", out=data, epochs=1, overwrite=True, verbose=False)
    assert _tree(data) == images


def test_a_run_is_replaced_only_with_overwrite_and_only_its_own_files(fashion_folder, tmp_path):
    out = tmp_path / "run"
    first = graft.train(fashion_folder, strategy="feature-extract", out=out, epochs=1, verbose=False)
    first_id = read_manifest(out).run_id
    from graft.shipping.export import export_onnx

    # Exported beside the bundle by default: the run's file, so it goes with the run.
    assert export_onnx(first.bundle_dir, check_images=sorted(fashion_folder.rglob("*.png"))[:2]).path == out / "model.onnx"
    finished = _tree(out)
    with pytest.raises(OutputError, match=r"holds a graft run already.*--overwrite.*--resume"):
        graft.train(fashion_folder, strategy="feature-extract", out=out, epochs=1, seed=1, verbose=False)
    assert _tree(out) == finished
    (out / "notes.txt").write_text("mine")
    second = graft.train(fashion_folder, strategy="feature-extract", out=out, epochs=1, seed=1, overwrite=True, verbose=False)
    assert read_manifest(out).run_id != first_id
    assert (out / "notes.txt").read_text() == "mine" and not (out / "model.onnx").exists()
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    assert json.loads((out / "split.json").read_text())["seed"] == 1
    assert second.metrics["num_train"] == first.metrics["num_train"]


@pytest.mark.slow
def test_a_killed_overwrite_never_leaves_two_runs_mixed(fashion_folder, tmp_path):
    out = tmp_path / "run"
    graft.train(fashion_folder, strategy="feature-extract", out=out, epochs=2, verbose=False)
    options = ["--strategy", "feature-extract", "--epochs", "100", "--patience", "100", "--seed", "1"]
    _kill_after_first_checkpoint(["train", fashion_folder, "--out", out, "--quiet", "--overwrite", *options], out)
    # Only the new run's files: the old one's results were removed before its config.json.
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    for name in ("metrics.json", "bundle", "report.html", "val_predictions.json", "forgetting.json"):
        assert not (out / name).exists(), name


def test_save_bundle_never_replaces_a_folder_graft_did_not_write(trained_run, tmp_path):
    from graft.shipping.bundle import save_bundle

    bundle = graft.load_bundle(trained_run.bundle_dir)
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "app.js").write_text("x")
    with pytest.raises(OutputError, match="graft did not write it"):
        save_bundle(target, bundle.model, bundle.meta)
    assert [p.name for p in target.iterdir()] == ["app.js"]


def test_removal_follows_manifests_and_keeps_what_a_user_added(tmp_path):
    """A comparison's folder holds run folders with their own manifests: each removes only its own names."""
    compare = claim_folder(tmp_path / "cmp", kind="compare", files=["compare.json", "partial", "partial.log"])
    run = claim_folder(compare.path / "partial", kind="run", files=["config.json", "bundle"])
    (run.path / "config.json").write_text("{}")
    (run.path / "bundle").mkdir()
    (run.path / "bundle" / "model.safetensors").write_bytes(b"\0")
    (run.path / ".bundle.0123abcd.old").mkdir()  # what a kill mid-rename leaves
    (run.path / "notes.txt").write_text("mine")
    (compare.path / "compare.json").write_text("{}")
    (compare.path / "partial.log").write_text("log")
    (compare.path / "data").mkdir()  # never listed: stays
    remove_owned(compare.path)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "cmp", "cmp/data", "cmp/partial", "cmp/partial/notes.txt"
    ]


def test_compare_and_demo_refuse_folders_graft_did_not_write(fashion_folder, tmp_path):
    from graft.demo import run_demo
    from graft.report.compare import compare

    folder = tmp_path / "mine"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "photo.png").write_bytes(b"png")
    with pytest.raises(OutputError, match=f"{folder}: the folder is not empty"):
        compare(fashion_folder, "feature-extract,partial", folder, overwrite=True)
    with pytest.raises(OutputError, match=f"{folder}: the folder is not empty"):
        run_demo(folder, overwrite=True)
    assert _tree(folder) == {"data/photo.png": b"png"}
    # A comparison's folder is replaced only when asked.
    claim_folder(tmp_path / "cmp", kind="compare", files=["compare.json"])
    (tmp_path / "cmp" / "compare.json").write_text("{}")
    with pytest.raises(OutputError, match="holds a graft compare folder already.*--overwrite"):
        compare(fashion_folder, "feature-extract,partial", tmp_path / "cmp")


def test_unusable_output_folders_are_one_error_line(fashion_folder, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    _one_error_line(_graft("train", fashion_folder, "--out", a_file), f"--out {a_file} is a file")
    _one_error_line(_graft("train", fashion_folder, "--out", a_file / "run"), f"{a_file} is a file")
    result = _graft("train", fashion_folder, "--out", tmp_path / "run", "--cache-dir", a_file)
    _one_error_line(result, f"--cache-dir {a_file} is a file")
    assert not (tmp_path / "run").exists()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    immutable = os.geteuid() == 0  # root writes through permissions; an immutable folder stops it
    if immutable:
        subprocess.run(["chattr", "+i", str(locked)], check=True)
    try:
        _one_error_line(_graft("train", fashion_folder, "--out", locked / "run"), f"{locked} is not writable")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(locked)], check=True)
        locked.chmod(0o755)


@pytest.mark.slow
def test_disk_full_is_one_error_line_and_the_run_resumes(fashion_folder, tmp_path):
    """A file-size limit makes the bundle's write fail like a full disk: the files written stay whole."""

    def small_files_only() -> None:  # Python ignores SIGXFSZ: the write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))

    out = tmp_path / "run"
    result = _graft("train", fashion_folder, "--out", out, "--strategy", "feature-extract", "--epochs", "2", "--quiet",
                    preexec_fn=small_files_only)
    line = _one_error_line(result, f"{out / 'bundle'}: cannot write", "whole", "--resume")
    for name in ("config.json", "split.json", "history.jsonl"):
        json.loads((out / name).read_text().splitlines()[0] if name.endswith("jsonl") else (out / name).read_text())
    assert not (out / "bundle").exists() and not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    command = line.split("continue with: ", 1)[1].split()
    assert command[:2] == ["graft", "train"] and command[-1] == "--resume"
    resumed = _graft(*command[1:])
    assert resumed.returncode == 0, resumed.stderr
    assert graft.load_bundle(out / "bundle").class_names


@pytest.mark.slow
def test_ctrl_c_prints_one_line_with_the_resume_command(fashion_folder, tmp_path):
    out = tmp_path / "run"
    # Images through the network: each epoch takes seconds, so the signal lands mid-training.
    args = ["train", fashion_folder, "--out", out, "--strategy", "partial", "--epochs", "3", "--quiet"]
    process = subprocess.Popen([sys.executable, "-m", "graft.cli.main", *map(str, args)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint" / "state.json").is_file():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "no checkpoint appeared in time"
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graft: interrupted; continue with: graft train "), stderr
    command = lines[0].split("continue with: ", 1)[1].split()
    assert command[-1] == "--resume" and str(out) in command and "partial" in command
    resumed = _graft(*command[1:])
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "metrics.json").read_text())["epochs_run"] == 3


def test_ctrl_c_in_any_command_is_one_line_and_exit_130(monkeypatch, capsys):
    """The interrupt reaches typer, which turns it into an exit code; graft still says why it stopped."""
    import graft.api
    from graft.cli.main import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(graft.api, "inspect", interrupted)
    assert main(["inspect", "efficientnet_lite0"]) == 130
    captured = capsys.readouterr()
    assert captured.err.strip() == "graft: interrupted" and captured.out == ""
