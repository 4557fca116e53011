"""`graft train` under torchrun: 2 CPU processes (gloo) on a small real folder."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _train(args, env_extra=None, launcher=()):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    command = [*launcher, "-m", "graft.cli.main", "train", *map(str, args), "--quiet"]
    if not launcher:
        command = [sys.executable, *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _torchrun():
    return (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


def _bundles(root):
    return sorted(p.parent for p in root.rglob("graft.json"))


@pytest.mark.parametrize("strategy, epochs", [("feature-extract", 20), ("gradual", 2)])
def test_two_processes_match_one_and_write_one_bundle(fashion_folder, tmp_path, strategy, epochs):
    # val_fraction 0.25 gives 9 validation images: 5 on one rank and 4 on the other (uneven).
    common = [fashion_folder, "--strategy", strategy, "--epochs", epochs, "--val-fraction", "0.25"]
    if strategy == "feature-extract":
        # Bitwise-close predictions need one precision in both runs. `auto` measures it on the
        # CPU (graft.speed.cpu_precision), with 2 threads in one process and 1 per rank under torchrun.
        common += ["--precision", "fp32"]
    _train([*common, "--out", tmp_path / "one", "--cache-dir", tmp_path / "c1"])
    _train([*common, "--out", tmp_path / "two", "--cache-dir", tmp_path / "c2"], launcher=_torchrun())

    assert _bundles(tmp_path / "two") == [tmp_path / "two" / "bundle"]
    assert not [p for p in (tmp_path / "two").rglob("*") if p.name.startswith(".")]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert one["num_val"] == two["num_val"] == 9 and sum(map(sum, two["confusion_matrix"])) == 9
    rows_one = json.loads((tmp_path / "one" / "val_predictions.json").read_text())
    rows_two = json.loads((tmp_path / "two" / "val_predictions.json").read_text())
    assert [r["path"] for r in rows_one] == [r["path"] for r in rows_two]
    if strategy == "feature-extract":
        # Features are sharded and gathered; the head then trains identically on every rank.
        assert two["confusion_matrix"] == one["confusion_matrix"]
        for a, b in zip(rows_one, rows_two):
            assert a["label"] == b["label"] and abs(a["score"] - b["score"]) < 1e-4
    else:
        # DDP averages gradients over two half-batches (one padded): close, not bitwise equal.
        assert abs(two["accuracy"] - one["accuracy"]) <= 2 / 9
        history = [json.loads(line) for line in (tmp_path / "two" / "history.jsonl").read_text().splitlines()]
        assert len(history) == 2 and history[1]["stage_thawed"]
        # `--precision auto`: rank 0 chose for both ranks, and recorded what it measured.
        from graft.speed.numerics import cpu_supports_bf16

        resolved = json.loads((tmp_path / "two" / "config.json").read_text())["resolved"]
        if cpu_supports_bf16():
            assert resolved["precision"] == resolved["precision_measured"]["precision"]
        else:
            assert resolved["precision"] == "fp32" and "precision_measured" not in resolved
