"""Exact classification metrics from sufficient statistics.

Each process accumulates, on its own device, a confusion matrix, the sum of per-sample losses and nothing
else (the sample count is the matrix's total). One all-reduce per evaluation adds them up, so the numbers
are identical whatever the number of processes and the batch size: no mean of batch means, no sample
counted twice when the sampler pads the last batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from launcher.tasks.base import BatchLoss, per_sample, unreduced


# The metrics of as_row("val") that can be monitored (best checkpoint, early stopping, plateau LR).
VAL_METRIC_NAMES = ("val_accuracy", "val_loss", "val_precision", "val_recall", "val_f1")


@dataclass(frozen=True)
class ClassificationMetrics:
    loss: float
    accuracy: float
    precision: float  # macro averages, see compute_metrics
    recall: float
    f1: float
    samples: int
    confusion_matrix: list[list[int]]  # rows: true class, columns: predicted class
    extra: dict = field(default_factory=dict)  # user metrics (fit/evaluate metrics=), by name

    def as_row(self, prefix: str) -> dict:
        return {f"{prefix}_loss": self.loss, f"{prefix}_accuracy": self.accuracy,
                f"{prefix}_precision": self.precision, f"{prefix}_recall": self.recall,
                f"{prefix}_f1": self.f1, f"{prefix}_samples": self.samples,
                f"{prefix}_confusion_matrix": self.confusion_matrix,
                **{f"{prefix}_{k}": v for k, v in self.extra.items()}}

    def with_extra(self, extra: dict) -> ClassificationMetrics:
        return ClassificationMetrics(**{**self.__dict__, "extra": {**self.extra, **extra}})


class ConfusionStats:
    """Running per-process statistics; `update` never reads a value back to the host.

    Everything lives in one float64 buffer: the C*C confusion counts (exact in float64 up to 2**53) and
    the loss sum, so one all-reduce moves all of it. float64 also keeps the loss sum independent of the
    summation order (world size, batch size) to far below 1e-6.
    """

    def __init__(self, num_classes: int, device: torch.device):
        self.num_classes = num_classes
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        self.buffer = torch.zeros(num_classes * num_classes + 1, dtype=dtype, device=device)
        # Made once rather than per batch: every tensor op saved in `update` is a few microseconds per step.
        self._counts = self.buffer[: num_classes * num_classes]
        self._loss_sum = self.loss_view = self.buffer[-1:]
        self._ones: dict[int, torch.Tensor] = {}

    def update(self, per_sample_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
               valid: int | None = None) -> None:
        """Add a batch. `valid` keeps only the first `valid` samples (the rest pad the last batch)."""
        if valid is not None and valid < targets.shape[0]:
            logits, targets = logits[:valid], targets[:valid]
            if per_sample_loss.dim():  # a custom step's summed loss cannot drop the repeats
                per_sample_loss = per_sample_loss[:valid]
        n = targets.shape[0]
        ones = self._ones.get(n)
        if ones is None:
            ones = self._ones[n] = torch.ones(n, dtype=self.buffer.dtype, device=self.buffer.device)
        # true * C + predicted, in one op; argmax and integer arithmetic record no autograd history.
        pairs = torch.add(logits.argmax(dim=-1), targets.long(), alpha=self.num_classes)
        # index_add_ rather than bincount: bincount on CUDA reads the max back to the host (a sync).
        self._counts.index_add_(0, pairs, ones)
        self._loss_sum.add_(per_sample_loss.detach().sum(dtype=self.buffer.dtype))

    def add_batch(self, batch: BatchLoss, valid: int | None = None) -> None:
        """The loop's entry (launcher.tasks.base.TaskStats.add_batch): losses in float32 as they always were."""
        self.update(batch.losses.float(), batch.outputs, batch.targets, valid)

    def loss_and_items(self) -> torch.Tensor:
        """[loss sum, samples] on the device (one host read per log interval)."""
        return torch.stack([self.buffer[-1], self._counts.sum()])

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.cpu().tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.buffer.copy_(torch.tensor(state["buffer"], dtype=self.buffer.dtype))

    def reduce(self) -> ClassificationMetrics:
        """All-reduce across processes (every rank must call this, in the same order) and compute."""
        total = self.buffer.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
        total = total.cpu()
        c = self.num_classes
        return compute_metrics(total[: c * c].round().to(torch.int64).view(c, c), float(total[-1]))


def compute_metrics(confusion: torch.Tensor, loss_sum: float) -> ClassificationMetrics:
    """Metrics from a (true x predicted) confusion matrix and the summed per-sample loss."""
    confusion = confusion.to(torch.float64)
    samples = int(confusion.sum().item())
    true_pos = confusion.diag()
    predicted = confusion.sum(dim=0)
    actual = confusion.sum(dim=1)
    precision = torch.where(predicted > 0, true_pos / predicted.clamp(min=1), torch.zeros_like(true_pos))
    recall = torch.where(actual > 0, true_pos / actual.clamp(min=1), torch.zeros_like(true_pos))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-300),
                     torch.zeros_like(true_pos))
    # Macro averages over the classes that occur as a label or a prediction, with 0 for an undefined
    # ratio: scikit-learn's precision_recall_fscore_support(average="macro", zero_division=0).
    present = (actual > 0) | (predicted > 0)
    n_present = max(int(present.sum().item()), 1)
    return ClassificationMetrics(
        loss=loss_sum / samples if samples else float("nan"),
        accuracy=float(true_pos.sum() / samples) if samples else float("nan"),
        precision=float(precision[present].sum() / n_present),
        recall=float(recall[present].sum() / n_present),
        f1=float(f1[present].sum() / n_present),
        samples=samples,
        confusion_matrix=confusion.to(torch.int64).tolist(),
    )


class SingleLabelClassification:
    """`single_label_classification`: logits (N, C) and class ids (N,); cross-entropy per sample (or the
    given `loss_fn`); accuracy, macro precision/recall/F1 and the confusion matrix (ConfusionStats)."""

    problem_type = "single_label_classification"
    token_level = False
    default_monitor = ("val_accuracy", "max")
    lower_is_better = ("loss",)

    def __init__(self, num_classes: int, loss_fn: Callable | None = None):
        if not (isinstance(num_classes, int) and num_classes >= 1):
            raise ValueError(f"single-label classification needs num_classes >= 1 (got {num_classes!r})")
        self.num_classes = num_classes
        self.loss_fn = unreduced(loss_fn if loss_fn is not None else torch.nn.CrossEntropyLoss())

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses = self.loss_fn(outputs, targets)
        return losses if losses.dim() == 1 else per_sample(losses)  # per_sample refuses a single number

    def stats(self, device: torch.device) -> ConfusionStats:
        return ConfusionStats(self.num_classes, device)

    def metric_names(self) -> tuple[str, ...]:
        return ("loss", "accuracy", "precision", "recall", "f1", "samples", "confusion_matrix")

    def train_row(self, metrics: ClassificationMetrics) -> dict:
        return {"train_loss": metrics.loss, "train_accuracy": metrics.accuracy, "train_samples": metrics.samples}

    def metric_inputs(self, outputs: Any, targets: Any) -> tuple[Any, Any]:
        return outputs, targets  # torchmetrics' multiclass metrics take logits and class ids

    def summary(self, row: dict) -> str:
        return (f"train_loss {row['train_loss']:.4f} train_acc {row['train_accuracy']:.4f} | "
                f"val_loss {row['val_loss']:.4f} val_acc {row['val_accuracy']:.4f} val_f1 {row['val_f1']:.4f}")

    def prediction_rows(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, list]:
        """One row per sample: the class id, the predicted class id and the class probabilities."""
        probabilities = outputs.detach().double().softmax(dim=-1)
        return {"label": targets.tolist(), "prediction": probabilities.argmax(dim=-1).tolist(),
                "probabilities": probabilities.tolist()}
