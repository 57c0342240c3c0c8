"""launcher: one PyTorch training loop from a laptop CPU to many GPU nodes on SLURM."""

from launcher.errors import EXIT_HUNG, EXIT_PREEMPTED, EXIT_USAGE, UsageError
from launcher.faults.timeouts import Timeouts
from launcher.loop import (
    EMA,
    Callback,
    Checkpointing,
    EarlyStopping,
    Monitor,
    Preempted,
    evaluate,
    fit,
    make_accelerator,
)
from launcher.loop.param_groups import param_groups
from launcher.tasks import (
    CausalLM,
    LossTask,
    MultiLabelClassification,
    Regression,
    SingleLabelClassification,
    StepOutput,
    TaskMetrics,
)
from launcher.tasks.classification import ClassificationMetrics, compute_metrics

__all__ = ["fit", "evaluate", "make_accelerator", "Monitor", "EarlyStopping", "Checkpointing", "Timeouts",
           "Preempted", "param_groups", "ClassificationMetrics", "compute_metrics", "SingleLabelClassification",
           "MultiLabelClassification", "Regression", "CausalLM", "LossTask", "StepOutput", "TaskMetrics",
           "UsageError", "EXIT_PREEMPTED", "EXIT_USAGE", "EXIT_HUNG", "Callback", "EMA"]
