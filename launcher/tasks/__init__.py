"""What a model is trained to do: its loss and its exact metrics, one module per task.

- `base`: the `Task` protocol, `TaskStats` (additive float64 sums in one device buffer, one all-reduce),
  `TaskMetrics`, `StepOutput` (what a custom step returns) and `LossTask` (a task known by its loss_fn);
- `classification`: `single_label_classification` (`ConfusionStats`, `ClassificationMetrics`);
- `multi_label`: `multi_label_classification`; `regression`: `regression`;
- `language_modeling`: `causal_lm`, a token-level loss with an ignore index;
- `metrics`: the user-metric protocol (torchmetrics' interface) and `MetricSet`, which feeds only real
  samples and forces float64, persistent state.

A task never imports the loop: the loop asks a task for its losses and statistics, feeds them batches and
reduces them. Names follow transformers' `config.problem_type`.
"""

from __future__ import annotations

from launcher.tasks.base import LossTask, StepOutput, Task, TaskMetrics, TaskStats
from launcher.tasks.classification import SingleLabelClassification
from launcher.tasks.language_modeling import CausalLM
from launcher.tasks.multi_label import MultiLabelClassification
from launcher.tasks.regression import Regression

PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")

__all__ = ["CausalLM", "LossTask", "MultiLabelClassification", "PROBLEM_TYPES", "Regression",
           "SingleLabelClassification", "StepOutput", "Task", "TaskMetrics", "TaskStats"]
