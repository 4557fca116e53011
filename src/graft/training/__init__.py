"""Training: one optimisation phase (`run_phase`) for every strategy, the task it optimises,
the loop, checkpoints, the feature cache and the metrics."""

from graft.training.phase import HeadSteps, Phase, PhaseResult, run_phase
from graft.training.task import CLASSIFICATION, ClassificationTask, Task, class_weights

__all__ = ["CLASSIFICATION", "ClassificationTask", "HeadSteps", "Phase", "PhaseResult", "Task", "class_weights", "run_phase"]
