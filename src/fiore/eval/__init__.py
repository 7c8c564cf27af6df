"""Evaluation: pure metric functions (`fiore.eval.metrics`), task-aware scorers, the runner and its report."""

from fiore.eval.report import Report, TaskReport
from fiore.eval.runner import evaluate, headline_metrics

__all__ = ["Report", "TaskReport", "evaluate", "headline_metrics"]
