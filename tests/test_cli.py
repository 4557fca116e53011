"""The `graft` command, run as a user runs it (a real subprocess)."""

import csv
import io
import json
import pickle
import subprocess
import sys

import pytest


def graft_cli(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "graft.cli.main", *map(str, args)], capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"graft {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr}")
    return result


def test_train_predict_evaluate_through_the_cli(fashion_folder, holdout_folder, tmp_path):
    out = tmp_path / "run"
    graft_cli("train", fashion_folder, "--out", out, "--strategy", "feature-extract", "--epochs", "15", "--quiet")
    assert (out / "bundle" / "graft.json").is_file()

    lines = graft_cli("predict", out / "bundle", holdout_folder, "--format", "json", "--top-k", "2").stdout.splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 18
    assert set(rows[0]) == {"path", "label", "score", "top_k", "unknown_score"} and len(rows[0]["top_k"]) == 2

    table = list(csv.DictReader(io.StringIO(graft_cli("predict", out, holdout_folder / "bag", "-f", "csv").stdout)))
    assert len(table) == 6 and table[0]["label"] in ("bag", "sneaker", "trouser")

    assert "bag" in graft_cli("predict", out / "bundle", next(holdout_folder.rglob("*.png"))).stdout

    metrics = json.loads(graft_cli("evaluate", out / "bundle", holdout_folder, "--json").stdout)
    assert metrics["num_images"] == 18 and "macro_f1" in metrics


def test_predict_lists_an_unreadable_file_and_goes_on(trained_run, holdout_folder, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really")
    good = next(holdout_folder.rglob("*.png"))
    result = graft_cli("predict", trained_run.bundle_dir, good, broken, "--format", "json", check=False)
    assert result.returncode == 1
    rows = {row["path"]: row for row in map(json.loads, result.stdout.splitlines())}
    assert set(rows) == {str(good), str(broken)}
    assert "label" in rows[str(good)] and "truncated" in rows[str(broken)]["error"]
    assert "broken.jpg" in result.stderr and "Traceback" not in result.stderr


def test_errors_are_one_clear_line(tmp_path):
    result = graft_cli("train", tmp_path / "nowhere", check=False)
    assert result.returncode == 2
    assert "nowhere" in result.stderr and "Traceback" not in result.stderr
    result = graft_cli("predict", tmp_path / "nobundle", tmp_path, check=False)
    assert result.returncode == 2 and "bundle" in result.stderr
    # An unknown option is a usage error: one message naming it, no traceback.
    result = graft_cli("train", tmp_path, "--bogus", "x", check=False)
    assert result.returncode == 2
    assert "No such option: --bogus" in result.stderr and "Traceback" not in result.stderr


def test_inspect_prints_stages(tmp_path):
    out = graft_cli("inspect", "efficientnet_lite0", "--strategy", "feature-extract").stdout
    assert "blocks.6+conv_head+bn2" in out and "mean (0.5, 0.5, 0.5)" in out and "eval" in out
    # Strategy options reach the audit: the last two stages train, the third from last stays frozen.
    out = graft_cli("inspect", "--strategy", "partial", "--train-stages", "2").stdout
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 3}
    # Without data, --bn-stats auto is undecided for the stages that train.
    assert "auto" in rows["blocks.5"] and "auto" in rows["blocks.6+conv_head+bn2"]
    assert rows["blocks.5"].split("│")[2].strip() == "1,652,640"
    assert "eval" in rows["blocks.4"] and rows["blocks.4"].split("│")[2].strip() == "0"
    out = graft_cli("inspect", "resnet50", "--architecture-only").stdout
    assert "layer4" in out and "2048" in out


def test_demo_runs_offline_end_to_end(tmp_path):
    result = graft_cli("demo", "--out", tmp_path / "demo", "--per-class", "10")
    text = result.stdout + result.stderr
    assert "holdout accuracy" in text and "done" in text
    metrics = json.loads((tmp_path / "demo" / "run" / "metrics.json").read_text())
    assert metrics["data"]["num_classes"] == 10 and metrics["num_train"] == 80


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("graft: error: ") and len(err.strip().splitlines()) == 1, err
    return err


def test_an_empty_folder_is_named_by_predict_and_the_api(trained_run, tmp_path, capsys):
    import pytest

    import graft
    from graft.cli.main import main
    from graft.errors import DataError

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("not an image")
    for extra in ([], ["--format", "json"], ["--out", str(tmp_path / "p.csv")]):
        assert main(["predict", str(trained_run.bundle_dir), str(empty), *extra]) == 2
        assert f"{empty}: no image files" in _one_error_line(capsys)
    assert not (tmp_path / "p.csv").exists()
    with pytest.raises(DataError, match="no image files"):
        graft.predict(trained_run.bundle_dir, [empty])


def test_evaluate_and_serve_choices_are_checked_before_any_work(tmp_path, capsys):
    from graft.cli.main import main

    # The bundle does not exist: the option is refused before anything is loaded.
    assert main(["evaluate", str(tmp_path / "no-bundle"), str(tmp_path), "--on-bad-image", "ignore"]) == 2
    assert "--on-bad-image: 'ignore' is not one of error, skip" in _one_error_line(capsys)
    assert main(["serve", str(tmp_path / "no-bundle"), "--log-level", "verbose"]) == 2
    assert "--log-level: 'verbose' is not one of critical, error, warning, info, debug, trace" in _one_error_line(capsys)


def _command_params(name):
    import typer.main

    from graft.cli.main import app

    return {param.name: param for param in typer.main.get_command(app).commands[name].params}


def test_train_options_are_the_config_fields_with_their_defaults_and_help():
    import dataclasses

    from graft.config import TrainConfig

    params = _command_params("train")
    fields = {field.name: field for field in dataclasses.fields(TrainConfig)}
    assert set(params) - set(fields) == {"quiet", "resume", "overwrite"} and set(fields) <= set(params)
    for name, field in fields.items():
        assert field.metadata["help"] and params[name].help == field.metadata["help"], name
        if name not in ("data", "out"):  # data is required; --out has the CLI's own default folder
            assert params[name].default == field.default, name
    assert params["train_bn"].opts == ["--train-bn"] and params["compile"].opts == ["--compile"]
    shown = graft_cli("train", "--help", check=False).stdout
    assert all(option in shown for name in fields if name != "data" for option in params[name].opts)


def test_inspect_and_compare_take_the_shared_options_from_the_config():
    import dataclasses

    from graft.config import TrainConfig

    fields = {field.name: field for field in dataclasses.fields(TrainConfig)}
    own = {"inspect": {"strategy"}, "compare": {"out", "epochs", "seed"}}  # their own meaning or default
    for command in ("inspect", "compare"):
        shared = [param for name, param in _command_params(command).items() if name in fields and name not in own[command]]
        assert len(shared) >= 7, command
        for param in shared:
            assert param.help == fields[param.name].metadata["help"], (command, param.name)
            assert param.name == "data" or param.default == fields[param.name].default, (command, param.name)


def test_library_errors_name_parameters_and_the_cli_shows_flags(tmp_path):
    from graft.cli.options import flag
    from graft.config import TrainConfig
    from graft.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^lr: expected a finite number in \(0, 10\]") as refused:
        TrainConfig(data=".", out=".", lr=float("inf"))
    assert refused.value.parameter == "lr"
    assert pickle.loads(pickle.dumps(refused.value)).parameter == "lr"  # as a worker process hands it back
    with pytest.raises(ConfigError, match="^warmup_epochs: expected a whole number") as refused:
        TrainConfig(data=".", out=".", warmup_epochs=-1)
    with pytest.raises(ConfigError, match="^strategy: 'finetune' is not one of") as refused:
        TrainConfig(data=".", out=".", strategy="finetune")
    assert [flag(name) for name in ("lr", "warmup_epochs", "max_upload_bytes")] == ["--lr", "--warmup-epochs", "--max-upload-mb"]
    result = graft_cli("train", tmp_path, "--out", tmp_path / "run", "--lr", "inf", check=False)
    assert result.returncode == 2 and result.stderr.startswith("graft: error: --lr: expected a finite number in (0, 10] ")
    assert result.stderr.rstrip().endswith("got inf") and len(result.stderr.splitlines()) == 1
    result = graft_cli("train", tmp_path, "--out", tmp_path / "run", "--warmup-epochs", "-1", check=False)
    assert result.returncode == 2 and result.stderr.startswith("graft: error: --warmup-epochs: expected a whole number")


def test_config_checks_strategy_names_without_importing_the_strategies():
    code = ("import sys; from graft.config import TrainConfig; TrainConfig(data='.', out='.', strategy='lp-ft'); "
            "print(sorted(m for m in sys.modules if m.startswith('graft.strategies')))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    from graft import strategies
    from graft.choices import STRATEGY_NAMES

    assert strategies.STRATEGY_NAMES == STRATEGY_NAMES == tuple(strategies._STRATEGY_CLASSES)
