"""bf16 or fp32 on a CPU that runs both: measured once per machine and backbone, then remembered.

A CPU with native bf16 does not always run a network faster in it. On one 2-core AVX-512 BF16
machine bf16 autocast ran EfficientNet-Lite0 about 1.7x as fast as fp32; on another (an AVX-512
BF16 CPU without AMX, oneDNN's ISA "AVX 10.1") the two ran at the same speed, and fp32 with
BatchNorm folded (`graft.speed.folding`) ran 1.3x as fast as bf16 (docs/benchmarks.md).
Which is faster depends on the chip and the network, so `precision="auto"` on such a CPU times
both on the backbone itself: its inference forward at the input size, fp32 folded against bf16
eager (what extraction and prediction run), alternated, after a warm-up. bf16 is chosen only if
it is at least `BF16_MIN_SPEEDUP` times as fast: fp32 is exact, so near-ties go to it.

The decision is kept in `cpu_precision.json` in graft's cache folder, keyed by the CPU, the torch
version, the thread count and the backbone, so the same machine makes the same choice every run
(features cached in one precision stay usable) and pays for the timing once (1.8-1.9 s for
EfficientNet-Lite0 on 2 cores). A short timing in a fresh process reads below the steady speed
(103-111 img/s for Lite0 in fp32 on the CPU without AMX, against 145 in a long run); the ratio of
the two is what decides. Delete the file to measure again; `--precision` overrides it.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from graft.atomic import write_json
from graft.models.backbones import Backbone
from graft.speed.folding import inference_network
from graft.speed.numerics import autocast

# bf16 must be at least this much faster than fp32 to be chosen.
BF16_MIN_SPEEDUP = 1.1
RECORD_FILE = "cpu_precision.json"
BATCH = 16
REPEATS = 3


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str
    fp32_images_per_second: float
    bf16_images_per_second: float
    measured_now: bool  # False: read from an earlier run's record

    def to_dict(self) -> dict:
        return {"precision": self.precision, "fp32_images_per_second": round(self.fp32_images_per_second, 1),
                "bf16_images_per_second": round(self.bf16_images_per_second, 1)}


def faster_precision(fp32_images_per_second: float, bf16_images_per_second: float) -> str:
    """The rule: bf16 when it runs at least `BF16_MIN_SPEEDUP` times as fast as fp32, else fp32."""
    return "bf16" if bf16_images_per_second >= BF16_MIN_SPEEDUP * fp32_images_per_second else "fp32"


def choose_cpu_precision(backbone: Backbone, cache_root: Path) -> PrecisionChoice:
    """The remembered choice for this machine and backbone, measuring it first if there is none."""

    path = Path(cache_root) / RECORD_FILE
    key = record_key(backbone)
    try:
        records = json.loads(path.read_text())
        if not isinstance(records, dict):
            records = {}
    except (OSError, ValueError):
        records = {}  # none yet, or unreadable: measured again and written whole
    found = records.get(key)
    if isinstance(found, dict) and found.get("precision") in ("fp32", "bf16"):
        try:
            return PrecisionChoice(found["precision"], float(found["fp32_images_per_second"]),
                                   float(found["bf16_images_per_second"]), measured_now=False)
        except (KeyError, TypeError, ValueError):
            pass
    fp32, bf16 = forward_speeds(backbone)
    choice = PrecisionChoice(faster_precision(fp32, bf16), fp32, bf16, measured_now=True)
    records[key] = choice.to_dict()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, records)
    except OSError:
        pass  # a read-only cache: the choice holds for this run and is measured again next time
    return choice


def record_key(backbone: Backbone) -> str:
    return " | ".join([
        _cpu_name(), f"torch {torch.__version__}", f"{torch.get_num_threads()} threads",
        backbone.architecture, str(backbone.weights_id), "x".join(str(v) for v in backbone.preprocessing.input_size),
    ])


def forward_speeds(backbone: Backbone) -> tuple[float, float]:
    """Images per second of the backbone's inference forward in fp32 (BatchNorm folded) and in bf16
    autocast, channels_last, batch 16 at its input size: medians of alternated repetitions."""

    model = backbone.model.eval().to(memory_format=torch.channels_last)
    size = tuple(backbone.preprocessing.input_size)
    # Its own generator: the global one seeds the run's head and batches, and a run that reads the
    # recorded choice must train exactly like the run that measured it.
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(BATCH, *size, generator=generator).contiguous(memory_format=torch.channels_last)
    cpu = torch.device("cpu")
    networks = {precision: inference_network(model, size, precision) for precision in ("fp32", "bf16")}
    seconds: dict[str, list[float]] = {"fp32": [], "bf16": []}
    with torch.inference_mode():
        for repeat in range(REPEATS + 1):
            for precision, network in networks.items():
                started = time.perf_counter()
                with autocast(precision, cpu):
                    network(inputs)
                if repeat:  # the first round is the warm-up (oneDNN picks and builds its kernels)
                    seconds[precision].append(time.perf_counter() - started)
    return BATCH / statistics.median(seconds["fp32"]), BATCH / statistics.median(seconds["bf16"])


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
