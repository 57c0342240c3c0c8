"""What every task is: a loss known as a sum and a count, and additive statistics summed once.

A task (single-label, multi-label, regression, causal LM, or a user's) tells the loop three things:
- `loss(outputs, targets)`: per-sample losses, shape (N,) (`token_level = False`: every sample weighs the
  same), or for a token-level task a pair of per-sample loss sums and per-sample item counts, both (N,)
  (every token weighs the same: the loop divides by the global count of the optimizer step);
- `stats(device)`: a `TaskStats`, additive float64 sums in one device buffer, so that one all-reduce per
  evaluation (or epoch) gives metrics that are exact at any world size and batch size, and a checkpoint of
  several ranks is summed into one on resume at another world size;
- `metric_inputs(outputs, targets)`: what user metrics (torchmetrics) receive: e.g. probabilities and
  multi-hot targets, or predictions in the original units of a regression.

A custom training step returns `StepOutput(loss, count, outputs, targets)` instead (several model
outputs, several loss terms, contrastive losses): the loop weighs it like a token-level loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Protocol, runtime_checkable

import torch
import torch.distributed as dist


class BatchLoss(NamedTuple):
    """One batch as the loop sees it: `losses` per sample (N,), or a scalar sum for a custom step; `counts`
    None (one item per sample), per-sample item counts (N,), or the scalar count of a custom step."""

    losses: torch.Tensor
    counts: torch.Tensor | None
    outputs: Any
    targets: Any


@dataclass
class StepOutput:
    """What a custom step (`fit(step=...)`) returns.

    loss: per-sample losses (N,) (best: the statistics then drop a padded last batch's repeats exactly), or
        one number, the loss summed over `count` items (tokens, pairs, ...).
    count: the items `loss` sums over (default: N, one per sample); the loop weighs every item of an
        optimizer step the same across processes and micro-batches.
    outputs, targets: what the task's statistics and the user metrics receive (optional for a LossTask).
    """

    loss: torch.Tensor
    count: torch.Tensor | int | None = None
    outputs: Any = None
    targets: Any = None


def stats_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


class TaskMetrics(dict):
    """A task's reduced metrics: a dict of name -> value (`loss`, `samples`, ...) that also reads as
    attributes (`metrics.loss`); `as_row("val")` prefixes the names for a metrics.jsonl row."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def as_row(self, prefix: str) -> dict:
        return {f"{prefix}_{k}": v for k, v in self.items()}

    def with_extra(self, extra: dict) -> TaskMetrics:
        return TaskMetrics({**self, **extra})


class TaskStats:
    """Per-process sums in one buffer: [loss sum, items the loss covers, then the task's own sums].

    `add_batch` never reads a value back to the host; `reduce` all-reduces a copy once (every rank must call
    it, in the same order) and computes the metrics on the host from the sums.
    """

    def __init__(self, size: int, device: torch.device):
        self.buffer = torch.zeros(2 + size, dtype=stats_dtype(device), device=device)
        self.loss_view = self.buffer[:1]
        self.items_view = self.buffer[1:2]

    def add_batch(self, batch: BatchLoss, valid: int | None = None) -> None:
        """Add a batch; `valid` keeps only its first `valid` samples (the rest pad a last batch)."""
        losses, counts = batch.losses, batch.counts
        if valid is not None and losses.dim() and valid < losses.shape[0]:
            losses = losses[:valid]
            counts = counts[:valid] if counts is not None and counts.dim() else counts
            batch = BatchLoss(losses, counts, _head(batch.outputs, valid), _head(batch.targets, valid))
        dtype = self.buffer.dtype
        self.loss_view.add_(losses.detach().sum(dtype=dtype))
        if counts is None:
            self.items_view.add_(losses.shape[0] if losses.dim() else 1)
        else:
            self.items_view.add_(torch.as_tensor(counts, device=self.buffer.device).sum(dtype=dtype))
        self._add(batch)

    def _add(self, batch: BatchLoss) -> None:
        """The task's own sums of a batch of real samples (nothing beyond the loss here)."""

    def loss_and_items(self) -> torch.Tensor:
        return self.buffer[:2]

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.cpu().tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.buffer.copy_(torch.tensor(state["buffer"], dtype=self.buffer.dtype))

    def reduce(self) -> TaskMetrics:
        total = all_reduced(self.buffer).cpu().to(torch.float64)
        loss_sum, items = float(total[0]), float(total[1])
        return TaskMetrics({"loss": loss_sum / items if items else float("nan"), **self.compute(total)})

    def compute(self, total: torch.Tensor) -> dict:
        """Metrics beyond the loss from the all-reduced buffer (on the host)."""
        return {"samples": int(round(float(total[1])))}


def all_reduced(buffer: torch.Tensor) -> torch.Tensor:
    """A summed copy of `buffer` across processes (every rank must call this, in the same order)."""
    total = buffer.clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return total


def sum_state_dicts(saved: list[dict]) -> dict:
    """Several ranks' `TaskStats.state_dict()`s added together (a resume at another world size)."""
    total = [0.0] * len(saved[0]["buffer"])
    for state in saved:
        total = [a + b for a, b in zip(total, state["buffer"])]
    return {"buffer": total}


def _head(value: Any, n: int) -> Any:
    return value[:n] if isinstance(value, torch.Tensor) and value.dim() else value


@runtime_checkable
class Task(Protocol):
    """The protocol a task implements (see the module docstring)."""

    problem_type: str
    token_level: bool
    default_monitor: tuple[str, str]  # (val_* key, "max" or "min")
    lower_is_better: tuple[str, ...]  # metric names (without prefix) that improve downward

    def loss(self, outputs: Any, targets: Any) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...

    def stats(self, device: torch.device) -> TaskStats: ...

    def metric_names(self) -> tuple[str, ...]: ...

    def train_row(self, metrics: TaskMetrics) -> dict: ...

    def metric_inputs(self, outputs: Any, targets: Any) -> tuple[Any, Any]: ...

    def summary(self, row: dict) -> str: ...

    # Optional, for launcher.loop.predict (--predictions): prediction_rows(outputs, targets) -> dict of
    # per-sample lists ("label", "prediction", "probabilities").


def per_sample(losses: torch.Tensor) -> torch.Tensor:
    """One loss per sample from an unreduced loss of any shape (N,), (N, 1), (N, K), ...: the mean over
    everything but the batch dimension (what the loss's own 'mean' gives when every sample has the same
    number of elements)."""
    if losses.dim() == 0:
        raise ValueError("loss_fn must return one loss per sample (reduction='none'); got a single number: "
                         "exact metrics need per-sample losses")
    return losses if losses.dim() == 1 else losses.reshape(losses.shape[0], -1).mean(dim=1)


def unreduced(loss_fn: Callable) -> Callable:
    """`loss_fn` with reduction='none' when it is a torch loss (a copy; the caller's object is unchanged)."""
    import copy

    if getattr(loss_fn, "reduction", None) not in (None, "none"):
        loss_fn = copy.copy(loss_fn)
        loss_fn.reduction = "none"
    return loss_fn


class LossTask:
    """A task known only by its per-sample `loss_fn` (any target shape): `val_loss` and `val_samples`, plus
    whatever user metrics are given. `lower_is_better` names the user metrics to minimise by default."""

    problem_type = "custom"
    token_level = False
    default_monitor = ("val_loss", "min")
    lower_is_better: tuple[str, ...] = ("loss",)

    def __init__(self, loss_fn: Callable | None = None):
        self.loss_fn = unreduced(loss_fn) if loss_fn is not None else None

    def loss(self, outputs: Any, targets: Any) -> torch.Tensor:
        if self.loss_fn is None:
            raise ValueError("this task has no loss_fn: pass loss_fn=, loss_fn='model' or step= to fit")
        return per_sample(self.loss_fn(outputs, targets))

    def stats(self, device: torch.device) -> TaskStats:
        return TaskStats(0, device)

    def metric_names(self) -> tuple[str, ...]:
        return ("loss", "samples")

    def train_row(self, metrics: TaskMetrics) -> dict:
        return {"train_loss": metrics.loss, "train_samples": metrics.samples}

    def metric_inputs(self, outputs: Any, targets: Any) -> tuple[Any, Any]:
        return outputs, targets

    def summary(self, row: dict) -> str:
        return f"train_loss {row['train_loss']:.4f} | val_loss {row['val_loss']:.4f}"
