"""`regression`: one target or several per sample, MSE; MAE, RMSE and R^2 in the targets' original units.

Targets may be standardized for training (the recipe does it with the training split's mean and std, as
it does the features): the model then predicts standardized values and the loss it trains on is the MSE in
those units, while every reported number (the loss included) is converted back with `target_mean` and
`target_std`, so `val_loss` is the MSE a user would compute from the predictions and the labels.

The statistics are sums (errors, squared errors, targets, squared targets per target column), exact in
float64 and summed once; R^2 is scikit-learn's r2_score with multioutput='uniform_average'.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from launcher.tasks.base import BatchLoss, TaskMetrics, TaskStats, per_sample, unreduced


class RegressionStats(TaskStats):
    """[loss sum, samples, sum |e| (K), sum e^2 (K), sum y (K), sum y^2 (K)] in original units."""

    def __init__(self, task: Regression, device: torch.device):
        k = task.num_targets
        super().__init__(4 * k, device)
        self.task, self.k = task, k
        self._abs, self._sq = self.buffer[2: 2 + k], self.buffer[2 + k: 2 + 2 * k]
        self._y, self._y2 = self.buffer[2 + 2 * k: 2 + 3 * k], self.buffer[2 + 3 * k:]

    def add_batch(self, batch: BatchLoss, valid: int | None = None) -> None:
        # The loss is reported in original units: replace the trained (standardized) losses by the MSE of the
        # original values, computed once here with the other sums.
        predictions, targets = self.task.original_units(batch.outputs, batch.targets)
        errors = (predictions - targets).to(self.buffer.dtype)
        super().add_batch(BatchLoss(errors.pow(2).mean(dim=1), None, errors, targets), valid)

    def _add(self, batch: BatchLoss) -> None:
        errors, targets = batch.outputs, batch.targets.to(self.buffer.dtype)
        self._abs.add_(errors.abs().sum(dim=0))
        self._sq.add_(errors.pow(2).sum(dim=0))
        self._y.add_(targets.sum(dim=0))
        self._y2.add_(targets.pow(2).sum(dim=0))

    def compute(self, total: torch.Tensor) -> dict:
        k, n = self.k, float(total[1])
        if not n:
            return {"mae": float("nan"), "rmse": float("nan"), "r2": float("nan"), "samples": 0}
        abs_e, sq_e, y, y2 = total[2:].view(4, k)
        total_var = y2 - y * y / n  # sum of squares about the mean, per target
        r2 = torch.where(total_var > 0, 1 - sq_e / total_var.clamp(min=1e-300),
                         torch.where(sq_e > 0, torch.zeros_like(sq_e), torch.ones_like(sq_e)))
        return {"mae": float(abs_e.sum() / (n * k)), "rmse": float((sq_e.sum() / (n * k)).sqrt()),
                "r2": float(r2.mean()), "samples": int(round(n))}


class Regression:
    """`regression`: outputs (N,) or (N, K) against float targets of the same size per sample."""

    problem_type = "regression"
    token_level = False
    default_monitor = ("val_loss", "min")
    lower_is_better = ("loss", "mae", "rmse")

    def __init__(self, num_targets: int = 1, target_mean: Sequence[float] | float | None = None,
                 target_std: Sequence[float] | float | None = None, loss_fn: Callable | None = None):
        if not (isinstance(num_targets, int) and num_targets >= 1):
            raise ValueError(f"regression needs num_targets >= 1 (got {num_targets!r})")
        self.num_targets = num_targets
        self.target_mean = torch.as_tensor(0.0 if target_mean is None else target_mean, dtype=torch.float64)
        self.target_std = torch.as_tensor(1.0 if target_std is None else target_std, dtype=torch.float64)
        self.loss_fn = unreduced(loss_fn if loss_fn is not None else torch.nn.MSELoss())
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _columns(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, k = targets.shape[0], self.num_targets
        if outputs.numel() != n * k or targets.numel() != n * k:
            raise ValueError(f"regression with {k} target(s) per sample got outputs of shape {tuple(outputs.shape)} "
                             f"and targets of shape {tuple(targets.shape)}; give the model as many outputs as "
                             f"targets, and Regression(num_targets=) that number")
        return outputs.reshape(n, k), targets.reshape(n, k).to(outputs.dtype)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        outputs, targets = self._columns(outputs, targets)
        return per_sample(self.loss_fn(outputs, targets))

    def original_units(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs, targets = self._columns(outputs.detach(), targets)
        scale = self._on.get(outputs.device)
        if scale is None:  # moved once per device: no copy per batch
            scale = self._on[outputs.device] = (self.target_mean.to(outputs.device), self.target_std.to(outputs.device))
        mean, std = scale
        return outputs.double() * std + mean, targets.double() * std + mean

    def stats(self, device: torch.device) -> RegressionStats:
        return RegressionStats(self, device)

    def metric_names(self) -> tuple[str, ...]:
        return ("loss", "mae", "rmse", "r2", "samples")

    def train_row(self, metrics: TaskMetrics) -> dict:
        return {"train_loss": metrics.loss, "train_mae": metrics.mae, "train_samples": metrics.samples}

    def metric_inputs(self, outputs: Any, targets: Any) -> tuple[Any, Any]:
        predictions, targets = self.original_units(outputs, targets)
        if self.num_targets == 1:  # torchmetrics' regression metrics take (N,) for one target
            return predictions[:, 0], targets[:, 0]
        return predictions, targets

    def summary(self, row: dict) -> str:
        return (f"train_loss {row['train_loss']:.4f} train_mae {row['train_mae']:.4f} | val_loss "
                f"{row['val_loss']:.4f} val_mae {row['val_mae']:.4f} val_rmse {row['val_rmse']:.4f} "
                f"val_r2 {row['val_r2']:.4f}")

    def prediction_rows(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, list]:
        """One row per sample: the target and the prediction in the original units (a list for several)."""
        predictions, targets = self.original_units(outputs, targets)
        if self.num_targets == 1:
            predictions, targets = predictions[:, 0], targets[:, 0]
        return {"label": targets.tolist(), "prediction": predictions.tolist()}
