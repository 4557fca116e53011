"""One strategy of `graft compare`, in its own process so that its peak memory is its own.

    python -m graft.report.compare_worker REQUEST.json RESULT.json

REQUEST.json holds a `TrainConfig` as a dict; RESULT.json receives the wall time and peak
resident memory (max RSS) of this process. Not a public interface: `graft.report.compare` runs it.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from graft.api import train_with_config
from graft.config import TrainConfig
from graft.console import Reporter


def main(argv: list[str]) -> int:
    request, result = Path(argv[0]), Path(argv[1])

    config = TrainConfig.from_dict(json.loads(request.read_text(encoding="utf-8")))
    started = time.perf_counter()
    run = train_with_config(config, reporter=Reporter(verbose=True))
    wall = time.perf_counter() - started
    # ru_maxrss is in kilobytes on Linux (bytes on macOS); this process ran only this strategy.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mb = peak / 1024 if sys.platform != "darwin" else peak / 2**20
    result.write_text(json.dumps({"wall_seconds": round(wall, 3), "peak_rss_mb": round(peak_mb, 1), "run_dir": str(run.run_dir)}), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
