"""`multi_label_classification`: K independent yes/no labels per sample; binary cross-entropy on logits.

Targets are multi-hot (N, K) (the data package turns a column of class-id lists into them). A label is
predicted when its logit is above 0 (probability 0.5). The statistics are per-class true positives, false
positives and false negatives plus the count of samples whose every label is right, so `f1_micro`,
`f1_macro` (scikit-learn's f1_score average='micro'/'macro', zero_division=0) and `exact_match`
(accuracy_score on the label sets) are exact after one all-reduce.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from launcher.tasks.base import BatchLoss, TaskMetrics, TaskStats, per_sample, unreduced


class MultiLabelStats(TaskStats):
    """[loss sum, samples, true positives (K), false positives (K), false negatives (K), exact matches]."""

    def __init__(self, num_labels: int, device: torch.device):
        super().__init__(3 * num_labels + 1, device)
        k = self.k = num_labels
        self._tp, self._fp = self.buffer[2: 2 + k], self.buffer[2 + k: 2 + 2 * k]
        self._fn, self._exact = self.buffer[2 + 2 * k: 2 + 3 * k], self.buffer[-1:]

    def _add(self, batch: BatchLoss) -> None:
        actual = batch.targets > 0.5
        predicted = batch.outputs.detach().reshape(actual.shape) > 0
        dtype = self.buffer.dtype
        self._tp.add_((predicted & actual).sum(dim=0, dtype=dtype))
        self._fp.add_((predicted & ~actual).sum(dim=0, dtype=dtype))
        self._fn.add_((~predicted & actual).sum(dim=0, dtype=dtype))
        self._exact.add_((predicted == actual).all(dim=1).sum(dtype=dtype))

    def compute(self, total: torch.Tensor) -> dict:
        k, n = self.k, float(total[1])
        tp, fp, fn = total[2:2 + 3 * k].view(3, k)
        denominator = 2 * tp + fp + fn
        per_class = torch.where(denominator > 0, 2 * tp / denominator.clamp(min=1), torch.zeros_like(tp))
        micro = float(2 * tp.sum() / denominator.sum()) if float(denominator.sum()) else 0.0
        return {"f1_micro": micro, "f1_macro": float(per_class.mean()),
                "exact_match": float(total[-1]) / n if n else float("nan"), "samples": int(round(n))}


class MultiLabelClassification:
    """`multi_label_classification`: logits (N, K) against multi-hot targets (N, K)."""

    problem_type = "multi_label_classification"
    token_level = False
    default_monitor = ("val_f1_micro", "max")
    lower_is_better = ("loss",)

    def __init__(self, num_labels: int, loss_fn: Callable | None = None):
        if not (isinstance(num_labels, int) and num_labels >= 1):
            raise ValueError(f"multi-label classification needs num_labels >= 1 (got {num_labels!r})")
        self.num_labels = num_labels
        self.loss_fn = unreduced(loss_fn if loss_fn is not None else torch.nn.BCEWithLogitsLoss())

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if outputs.shape != targets.shape or outputs.shape[-1] != self.num_labels:
            raise ValueError(f"multi-label classification with {self.num_labels} labels needs logits and "
                             f"multi-hot targets of shape (N, {self.num_labels}); got {tuple(outputs.shape)} and "
                             f"{tuple(targets.shape)}")
        return per_sample(self.loss_fn(outputs, targets.to(outputs.dtype)))

    def stats(self, device: torch.device) -> MultiLabelStats:
        return MultiLabelStats(self.num_labels, device)

    def metric_names(self) -> tuple[str, ...]:
        return ("loss", "f1_micro", "f1_macro", "exact_match", "samples")

    def train_row(self, metrics: TaskMetrics) -> dict:
        return {"train_loss": metrics.loss, "train_f1_micro": metrics.f1_micro, "train_samples": metrics.samples}

    def metric_inputs(self, outputs: Any, targets: Any) -> tuple[Any, Any]:
        return outputs, targets.long()  # torchmetrics' multilabel metrics take logits and integer targets

    def summary(self, row: dict) -> str:
        return (f"train_loss {row['train_loss']:.4f} train_f1_micro {row['train_f1_micro']:.4f} | val_loss "
                f"{row['val_loss']:.4f} val_f1_micro {row['val_f1_micro']:.4f} val_f1_macro "
                f"{row['val_f1_macro']:.4f} val_exact_match {row['val_exact_match']:.4f}")

    def prediction_rows(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, list]:
        """One row per sample: the true and the predicted class ids (lists), and each label's probability."""
        predicted = outputs.detach() > 0
        ids = lambda hot: [torch.nonzero(row).flatten().tolist() for row in hot]  # noqa: E731
        return {"label": ids(targets > 0.5), "prediction": ids(predicted),
                "probabilities": outputs.detach().double().sigmoid().tolist()}
