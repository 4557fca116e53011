"""The steps of a run (graft.run), each alone, on the bundled backbone and real images."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import torch
from rich.console import Console

from graft.config import TrainConfig
from graft.console import Reporter
from graft.input.data import load_dataset
from graft.run import Numerics, _plan_strategy, _resolve_numerics


def recording_reporter() -> tuple[Reporter, io.StringIO]:
    out = io.StringIO()
    return Reporter(console=Console(file=out, width=200)), out


def test_planning_resolves_batchnorm_statistics_apart_from_the_options_as_given(fashion_folder, lite0):
    config = TrainConfig(data=str(fashion_folder), out="unused", strategy="partial", train_stages=1)
    dataset = load_dataset(config.data, val_fraction=config.val_fraction, seed=config.seed)
    reporter, out = recording_reporter()

    plan = _plan_strategy(config, lite0, dataset, reporter)

    assert config.bn_stats == "auto"  # what config.json records as given
    assert plan.resolved_config.bn_stats == "frozen"  # a few images per class: statistics stay frozen
    assert plan.resolved_config.replace(bn_stats="auto") == config
    assert plan.head_spec.num_classes == 3 and plan.head_spec.in_features == lite0.num_features
    training = [row for row in plan.audit if row.trainable_params]
    assert [row.stage for row in training][-1] == "head" and len(training) == 2  # the last stage and the head
    assert all(row.bn_mode in ("eval", "-") for row in plan.audit)
    assert "strategy partial: what trains" in out.getvalue()


def test_numerics_are_resolved_from_the_options_alone_when_they_name_them(fashion_folder, lite0, tmp_path):
    config = TrainConfig(data=str(fashion_folder), out="unused", precision="fp32", compile="on")
    dataset = load_dataset(config.data, val_fraction=config.val_fraction, seed=config.seed)
    reporter, out = recording_reporter()

    numerics = _resolve_numerics(config, lite0, dataset, torch.device("cpu"), tmp_path, reporter)

    assert numerics == Numerics(device=torch.device("cpu"), precision="fp32", precision_measured=None, compile_backbone=True)
    images = len(dataset.train) + len(dataset.val)
    assert f"compiling the frozen backbone's forward (--compile on; {images} images)" in out.getvalue()
    assert list(tmp_path.iterdir()) == []  # nothing measured, nothing remembered


def test_strategies_print_their_audit_through_the_console_layer_not_the_api():
    # auto prints the chosen strategy's audit; the printing helper lives below the public API.
    probe = "import sys, graft.strategies.auto, graft.console as c; print('graft.api' in sys.modules, c.show_audit.__module__)"
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert found.stdout.split() == ["False", "graft.console"]
