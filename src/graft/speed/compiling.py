"""torch.compile for the training step, decided from the run's own measured steps.

Compiling a training network costs tens of seconds before its first step and pays back a
fraction of every later step (bench/gpu_resnet50.py on one H100: docs/benchmarks.md). Whether a
run is long enough to win is only known once its steps have been timed, so under
`--compile auto` on a GPU graft runs the first steps eagerly, times a window of them, and
compiles when the time it expects to save over the rest of the run is larger than the time it
expects compiling to take:

    remaining steps x step time x (1 - 1 / TRAIN_COMPILE_SPEEDUP) > TRAIN_COMPILE_SECONDS

If the GPU waited for its input during that window (the decoding workers are the bottleneck), a
faster step would not shorten the run, and graft stays eager. On a CPU `auto` keeps training
eager: the break-even of a compiled training step was not measured there (`--compile on`
compiles anyway). On one GPU the compiled step replays CUDA graphs (`compile_mode`). A batch of
another size than the first (the last, partial one) runs eagerly rather than recompiling, and a
failed compilation warns and continues eagerly. A stage that thaws recompiles (gradual).
"""

from __future__ import annotations

import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from graft.training import distributed

# Conservative figures for the rule above, from bench/gpu_resnet50.py on one H100 (bf16, CUDA
# graphs, docs/benchmarks.md): the compiled step ran 1.43x eager for ResNet-50 at batch 256 and
# 3.6x for EfficientNet-Lite0 at batch 32, after 45 s and 35 s of compiling (60 s without CUDA
# graphs). graft assumes the lower speed-up and the longest compile.
TRAIN_COMPILE_SPEEDUP = 1.4
TRAIN_COMPILE_SECONDS = 60.0
# The steps timed before deciding: after the first few (cuDNN autotuning, worker start-up).
PROBE_START = 3
PROBE_STEPS = 10
# The GPU counts as waiting for input when the waits add up to this share of the compute time.
INPUT_BOUND_SHARE = 0.1


@dataclass
class CompileDecision:
    """What the probe measured and what was decided (recorded in metrics.json)."""

    setting: str
    compiled: bool = False
    reason: str = ""
    step_seconds: float | None = None
    input_wait_seconds: float | None = None
    remaining_steps: int | None = None
    compile_seconds: float | None = None

    def to_dict(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class TrainingCompiler:
    """Hands `TrainSteps` the network to run for each batch: compiled, or the eager one.

    `setting` is the run's `--compile` ("auto", "on" or "off"); `total_steps` the optimizer
    steps the run will take at most (early stopping may cut it short, which the rule ignores).
    `say` reports the decision and the compile time.
    """

    setting: str
    device: torch.device
    total_steps: int
    say: Callable[[str], None] = print
    backend: str | Callable = "inductor"  # torch.compile's backend
    mode: str | None = None  # torch.compile's mode; None: `compile_mode(device)`
    decision: CompileDecision = field(init=False)
    _state: str = field(init=False, default="eager")  # "probing", "compile", "eager" (final)
    _compiled: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = field(init=False, default_factory=weakref.WeakKeyDictionary)
    _batch_size: int | None = field(init=False, default=None)
    _steps: int = field(init=False, default=0)
    _probe: list[tuple[float, float]] = field(init=False, default_factory=list)  # (input wait, compute) per step
    _last_end: float | None = field(init=False, default=None)
    _step_start: float = field(init=False, default=0.0)
    _first_compiled_step: bool = field(init=False, default=True)

    def __post_init__(self) -> None:
        self.decision = CompileDecision(self.setting)
        if self.setting == "on":
            self._state = "compile"
            self.decision.compiled, self.decision.reason = True, "--compile on"
        elif self.setting == "off":
            self.decision.reason = "--compile off"
        elif self.device.type != "cuda":
            self.decision.reason = "--compile auto keeps training eager on a CPU (its break-even was not measured)"
        elif self.total_steps < PROBE_START + PROBE_STEPS + 1:
            self.decision.reason = f"the run has only {self.total_steps} steps"
        else:
            self._state = "probing"

    def network_for(self, eager: nn.Module, batch_size: int) -> nn.Module | None:
        """The compiled network for this batch, or None to run `eager`."""
        if self._state == "probing" and self._steps >= PROBE_START:
            self._synchronize()
            now = time.perf_counter()
            wait = now - self._last_end if self._last_end is not None else 0.0
            self._step_start = now
            self._probe.append((wait, 0.0))
        if self._state != "compile":
            return None
        if self._batch_size is None:
            self._batch_size = batch_size
        if batch_size != self._batch_size:
            return None  # a partial last batch: eager, not a second compilation
        if eager not in self._compiled:
            self._compiled[eager] = torch.compile(eager, backend=self.backend, mode=self.mode or compile_mode(self.device))
        if self._first_compiled_step:
            self._synchronize()
            self._step_start = time.perf_counter()
        return self._compiled[eager]

    def after_step(self, compiled: bool) -> None:
        """Told after every step (and whether it ran compiled)."""
        self._steps += 1
        if compiled and self._first_compiled_step:
            self._synchronize()
            self._first_compiled_step = False
            self.decision.compile_seconds = round(time.perf_counter() - self._step_start, 2)
            self.say(f"compiled the training step in {self.decision.compile_seconds:.0f} s ({self.decision.reason})")
        if self._state != "probing":
            return
        if self._steps > PROBE_START:
            self._synchronize()
            self._last_end = time.perf_counter()
            wait, _ = self._probe[-1]
            self._probe[-1] = (wait, self._last_end - self._step_start)
        elif self._steps == PROBE_START:
            self._synchronize()
            self._last_end = time.perf_counter()
        if len(self._probe) == PROBE_STEPS and self._probe[-1][1] > 0:
            self._decide()

    def epoch_ended(self) -> None:
        """Between epochs the loop validates: that time is not the GPU waiting for its input."""
        self._last_end = None

    def failed(self, error: Exception) -> None:
        """Compiling failed: warn and stay eager for the rest of the run."""
        warnings.warn(f"torch.compile of the training step failed ({type(error).__name__}: {error}); training eagerly instead", stacklevel=3)
        self._state = "eager"
        self.decision.compiled = False
        self.decision.reason = f"compiling failed ({type(error).__name__})"

    def _decide(self) -> None:

        count = len(self._probe)
        wait = sum(w for w, _ in self._probe) / count
        compute = sum(c for _, c in self._probe) / count
        remaining = self.total_steps - self._steps
        compile_now, reason = compile_pays_off(compute, wait, remaining)
        compile_now = distributed.from_main(compile_now)  # every rank does what rank 0 measured
        d = self.decision
        d.step_seconds, d.input_wait_seconds, d.remaining_steps = round(compute + wait, 5), round(wait, 5), remaining
        d.compiled, d.reason = compile_now, reason
        self._state = "compile" if compile_now else "eager"
        self.say(("compiling the training step: " if compile_now else "training stays eager: ") + reason)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def compile_pays_off(compute_seconds: float, wait_seconds: float, remaining_steps: int) -> tuple[bool, str]:
    """The rule of the module docstring: (compile?, why), from one step's measured compute time and
    input wait and the steps left."""
    if wait_seconds > INPUT_BOUND_SHARE * compute_seconds:
        return False, (f"the GPU waited for input {wait_seconds / compute_seconds:.0%} of its compute time: "
                       "a faster step would not shorten the run")
    saving = remaining_steps * compute_seconds * (1 - 1 / TRAIN_COMPILE_SPEEDUP)
    pays = saving > TRAIN_COMPILE_SECONDS
    return pays, (f"{remaining_steps} steps left at {(compute_seconds + wait_seconds) * 1000:.1f} ms: about {saving:.0f} s "
                  f"to save {'>' if pays else '<='} {TRAIN_COMPILE_SECONDS:.0f} s to compile")


def compile_mode(device: torch.device) -> str:
    """torch.compile's mode for training steps: CUDA graphs on one GPU, where a small backbone's
    step is bound by kernel launches (EfficientNet-Lite0 at batch 32 on an H100: 3.35x eager with
    them, 1.03x without); the default elsewhere (a CPU; DDP, whose hooks CUDA graphs do not take)."""

    return "reduce-overhead" if device.type == "cuda" and not distributed.active() else "default"
