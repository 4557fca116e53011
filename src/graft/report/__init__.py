"""What transfer did: the run report, its figures, forgetting per stage, explanations, compare.

matplotlib and grad-cam are imported by these modules only (the `report` extra), never by
`import graft`.

    >>> from graft.report import write_report, compare
    >>> write_report("runs/birds")                      # runs/birds/report.html
    >>> compare("photos/", ["feature-extract", "partial"], "runs/cmp")   # runs/cmp/compare.html
"""

from __future__ import annotations

from graft.report.compare import compare
from graft.report.forgetting import StageForgetting, linear_cka, stage_forgetting, weight_drift
from graft.report.html import write_report

__all__ = ["StageForgetting", "compare", "linear_cka", "stage_forgetting", "weight_drift", "write_report"]
