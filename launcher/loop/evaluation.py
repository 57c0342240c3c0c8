"""Exact validation metrics (`evaluate`): the task's statistics all-reduced once, user metrics computed once."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device

from launcher.data.sampling import find_elastic_sampler, iterate
from launcher.faults.gloo_exit import settle_gloo_workers_at_exit
from launcher.loop.accelerator import make_accelerator
from launcher.loop.batches import (
    UnpackBatch,
    batch_losses,
    default_unpack,
    last_batch_remainder,
    resolve_task,
    samples_in,
    valid_in_batch,
)
from launcher.loop.steps import _no_autocast
from launcher.tasks.base import BatchLoss, Task
from launcher.tasks.metrics import MetricSet


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable, loss_fn: Callable | str | None = None, *,
             task: Task | None = None, num_classes: int | None = None, metrics: Mapping[str, Any] | None = None,
             step: Callable | None = None, accelerator: Accelerator | None = None,
             unpack_batch: UnpackBatch = default_unpack, prepare: bool = False) -> Any:
    """Exact validation metrics, all-reduced once. Every rank must call this.

    The task and its loss as for `fit` (`task=`, `num_classes=` for single-label classification, a per-sample
    `loss_fn`, `loss_fn='model'` or `step=`); `metrics=` user metrics by name. Returns the task's metrics
    (`ClassificationMetrics` for single-label classification, else a `TaskMetrics` dict), user metrics
    included (`.as_row("val")` gives `val_<name>`). Pass `prepare=True` for a model/loader that Accelerate
    has not prepared yet.
    """
    settle_gloo_workers_at_exit()  # a user-built Accelerator too (launcher.faults.gloo_exit)
    accelerator = accelerator or make_accelerator()
    task = resolve_task(task, loss_fn, num_classes, step)
    elastic = find_elastic_sampler(loader) is not None  # sharded by its sampler: Accelerate must not re-shard it
    if prepare:
        model, loader = (accelerator.prepare(model), loader) if elastic else accelerator.prepare(model, loader)
    return _evaluate(model, loader, task, batch_losses(task, unpack_batch, loss_fn, step),
                     MetricSet(metrics, accelerator.device), accelerator)


@torch.no_grad()
def _evaluate(model: torch.nn.Module, loader: Iterable, task: Task, compute: Callable[[Any, Any], BatchLoss],
              metrics: MetricSet, accelerator: Accelerator) -> Any:
    elastic = find_elastic_sampler(loader) is not None
    move = elastic and accelerator.device.type != "cpu"
    stats = task.stats(accelerator.device)
    metrics.reset()
    was_training = model.training
    remainder = last_batch_remainder(loader)
    # Without native AMP, accelerator.autocast() is a nullcontext; building it costs ~5 us per batch.
    autocast = accelerator.autocast if accelerator.native_amp else _no_autocast
    model.eval()
    for batch in iterate(loader) if elastic else loader:
        if move:
            batch = send_to_device(batch, accelerator.device, non_blocking=True)
        with autocast():
            out = compute(model, batch)
        is_last = getattr(loader, "end_of_dataloader", False)
        n = samples_in(out)
        valid = valid_in_batch(is_last, remainder, n, accelerator.process_index) if n is not None else None
        stats.add_batch(out, valid)
        if metrics:
            metrics.update(*task.metric_inputs(out.outputs, out.targets), valid)
    model.train(was_training)
    result = stats.reduce()
    return result.with_extra(metrics.compute()) if metrics else result
