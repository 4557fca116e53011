"""Training: one optimisation phase (`run_phase`) for every strategy, and the task it optimises."""

from graft.training.phase import HeadSteps, Phase, PhaseResult, run_phase
from graft.training.task import CLASSIFICATION, ClassificationTask, Task, class_weights

__all__ = ["CLASSIFICATION", "ClassificationTask", "HeadSteps", "Phase", "PhaseResult", "Task", "class_weights", "run_phase"]
