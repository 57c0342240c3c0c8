"""User metrics: any object with torchmetrics' interface (`update(preds, target)`, `compute()`,
`reset()`), by name: `fit(..., metrics={"top2": MulticlassAccuracy(num_classes, top_k=2)})` adds
`val_top2` to every epoch row.

The loop owns exactness, not the metric: `MetricSet` feeds each metric only the real samples of a batch
(never the samples a sampler repeats to pad a last batch), with the task's `metric_inputs` (probabilities
or logits, targets in original units); a torchmetrics metric is switched to float64 states
(`set_dtype`) and persistent state (`persistent(True)`, so its state_dict is not empty) when it is built
into the set; `compute()` runs on every rank once per validation (torchmetrics all-gathers its states
there). A metric whose state is a sum (mean errors, accuracies, confusion-based scores) is then exact at
any world size; one that keeps every sample (exact AUROC, `cat` states) is exact too but costs memory and
an all-gather of every kept value: prefer `thresholds=` (binned) versions on large splits.

A metric of your own: a class with `update`/`compute`/`reset` that reduces across processes in `compute`
(e.g. a torchmetrics.Metric subclass with `add_state(..., dist_reduce_fx="sum")`); docs/tasks.md.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable

import torch


@runtime_checkable
class Metric(Protocol):
    def update(self, preds: Any, target: Any) -> None: ...

    def compute(self) -> Any: ...

    def reset(self) -> None: ...


def _as_number(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    return value


class MetricSet:
    """The user metrics of one run, fed real samples only and computed together."""

    def __init__(self, metrics: Mapping[str, Any] | None, device: torch.device):
        self.metrics: dict[str, Any] = {}
        for name, metric in (metrics or {}).items():
            if not isinstance(metric, Metric):
                raise ValueError(f"metric {name!r} ({type(metric).__name__}) needs update(preds, target), compute() "
                                 f"and reset(), as torchmetrics' metrics have")
            if hasattr(metric, "set_dtype"):
                metric.set_dtype(torch.float64 if device.type != "mps" else torch.float32)
            if hasattr(metric, "persistent"):
                metric.persistent(True)
            if hasattr(metric, "to"):
                metric.to(device)
            self.metrics[name] = metric

    def __bool__(self) -> bool:
        return bool(self.metrics)

    def names(self) -> tuple[str, ...]:
        return tuple(self.metrics)

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()

    def update(self, preds: Any, target: Any, valid: int | None) -> None:
        if valid is not None:
            preds, target = preds[:valid], target[:valid]
        if not len(target):
            return  # a rank whose share of a last batch is empty or all padding
        for metric in self.metrics.values():
            metric.update(preds, target)

    def compute(self) -> dict[str, Any]:
        """Every rank calls this (torchmetrics synchronises its states inside `compute`)."""
        return {name: _as_number(metric.compute()) for name, metric in self.metrics.items()}
