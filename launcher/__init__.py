"""launcher: one PyTorch training loop from a laptop CPU to many GPU nodes on SLURM."""

from launcher.errors import EXIT_HUNG, EXIT_PREEMPTED, EXIT_USAGE, UsageError
from launcher.loop import Preempted, evaluate, fit, make_accelerator
from launcher.metrics import ClassificationMetrics, compute_metrics

__all__ = ["fit", "evaluate", "make_accelerator", "Preempted", "ClassificationMetrics", "compute_metrics",
           "UsageError", "EXIT_PREEMPTED", "EXIT_USAGE", "EXIT_HUNG"]
