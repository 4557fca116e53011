"""Compiling the training step: the rule, and that a compiled step trains like an eager one."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from graft.speed.compiling import TRAIN_COMPILE_SECONDS, TRAIN_COMPILE_SPEEDUP, TrainingCompiler, compile_pays_off
from graft.training.loop import TrainSteps, make_optimizer, warmup_cosine_schedule

CPU = torch.device("cpu")


def test_compiling_pays_off_only_when_the_saving_beats_the_compile_time() -> None:
    step = 0.05
    saving_per_step = step * (1 - 1 / TRAIN_COMPILE_SPEEDUP)
    enough = int(TRAIN_COMPILE_SECONDS / saving_per_step) + 10
    assert compile_pays_off(step, 0.0, enough)[0]
    pays, reason = compile_pays_off(step, 0.0, enough // 2)
    assert not pays and "to save" in reason
    # A GPU that waits for its input would not finish sooner with a faster step.
    pays, reason = compile_pays_off(step, step, 100 * enough)
    assert not pays and "waited for input" in reason


def test_settings_that_need_no_measurement() -> None:
    assert TrainingCompiler("off", CPU, 10_000).decision.reason == "--compile off"
    auto = TrainingCompiler("auto", CPU, 10**6)
    assert not auto.decision.compiled and "CPU" in auto.decision.reason
    assert auto.network_for(nn.Linear(2, 2), 8) is None
    assert TrainingCompiler("on", CPU, 1).decision.compiled


def _net() -> nn.Module:
    # No bias before the BatchNorm: its gradient is zero up to rounding, which Adam would amplify.
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def _steps(model: nn.Module, compiler: TrainingCompiler | None) -> TrainSteps:
    optimizer = make_optimizer([{"params": list(model.parameters()), "lr": 1e-2}], CPU)
    scheduler = warmup_cosine_schedule(optimizer, epochs=1, steps_per_epoch=4, warmup_epochs=0)
    return TrainSteps(model, nn.CrossEntropyLoss(), optimizer, scheduler, precision="fp32", device=CPU, compiler=compiler)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on a CPU needs a C++ compiler (g++); install it with apt-get install g++")
def test_a_compiled_training_step_trains_like_the_eager_one() -> None:
    torch.manual_seed(1)
    batches = [(torch.randn(n, 3, 12, 12), torch.randint(0, 3, (n,))) for n in (6, 6, 6, 4)]  # a short last batch
    eager, compiled = _net(), _net()
    said: list[str] = []
    compiler = TrainingCompiler("on", CPU, len(batches), say=said.append)
    eager_steps, compiled_steps = _steps(eager, None), _steps(compiled, compiler)
    for images, labels in batches:
        eager_steps(images, labels)
        compiled_steps(images, labels)
    # Really compiled (dynamo made a graph of it), once, for the full batches; the last ran eagerly.
    assert len(compiler._compiled) == 1 and compiler._batch_size == 6
    assert compiler.decision.compile_seconds is not None and said and "compiled the training step" in said[0]
    for mine, theirs in zip(compiled.state_dict().values(), eager.state_dict().values()):
        assert torch.allclose(mine.float(), theirs.float(), atol=1e-5)
    assert compiled_steps.epoch_result()[0] == pytest.approx(eager_steps.epoch_result()[0], rel=1e-5)


def test_a_failed_compile_warns_and_trains_eagerly() -> None:
    def broken_backend(graph, example_inputs):
        raise RuntimeError("this backend cannot compile anything")

    batches = [(torch.randn(6, 3, 12, 12), torch.randint(0, 3, (6,))) for _ in range(3)]
    eager, other = _net(), _net()
    compiler = TrainingCompiler("on", CPU, len(batches), say=lambda _: None, backend=broken_backend)
    eager_steps, other_steps = _steps(eager, None), _steps(other, compiler)
    with pytest.warns(UserWarning, match="torch.compile of the training step failed"):
        for images, labels in batches:
            eager_steps(images, labels)
            other_steps(images, labels)
    assert not compiler.decision.compiled and "failed" in compiler.decision.reason
    for mine, theirs in zip(other.state_dict().values(), eager.state_dict().values()):
        assert torch.equal(mine, theirs)


def test_the_probe_does_not_count_validation_between_epochs_as_input_wait() -> None:
    """The GPU path's timing window, driven on the CPU: an epoch boundary (validation) inside
    the window is not the GPU waiting for its input."""
    import time

    from graft.speed.compiling import PROBE_START, PROBE_STEPS

    compiler = TrainingCompiler("auto", CPU, 1000, say=lambda _: None)
    compiler._state = "probing"  # what "auto" does on a GPU; on a CPU it decides without measuring
    net = nn.Linear(2, 2)
    for step in range(PROBE_START + PROBE_STEPS):
        if step == PROBE_START + 2:
            compiler.epoch_ended()
            time.sleep(0.3)  # the loop validates between epochs
        assert compiler.network_for(net, 4) is None  # probing steps run eagerly
        time.sleep(0.01)  # the step's compute
        compiler.after_step(False)
    decision = compiler.decision
    assert decision.step_seconds is not None and decision.remaining_steps == 1000 - PROBE_START - PROBE_STEPS
    assert decision.input_wait_seconds < 0.005
    assert not decision.compiled and "steps left" in decision.reason
