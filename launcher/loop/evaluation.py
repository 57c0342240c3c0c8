"""Exact validation metrics (`evaluate`): the task's statistics all-reduced once, user metrics computed once."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device

from launcher.data.sampling import find_elastic_sampler, iterate
from launcher.faults.gloo_exit import settle_gloo_workers_at_exit
from launcher.faults.timeouts import Timeouts
from launcher.faults.watchdog import NO_WATCHDOG, NoWatchdog, start_watchdog
from launcher.loop.accelerator import make_accelerator
from launcher.loop.batches import (
    UnpackBatch,
    batch_losses,
    default_unpack,
    head_of_batch,
    last_batch_remainder,
    resolve_task,
    samples_in,
    valid_in_batch,
)
from launcher.loop.steps import _no_autocast
from launcher.loop.user_model import user_step
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
    with bounded(accelerator) as watchdog, watchdog.evaluating():
        return _evaluate(model, loader, task, batch_losses(task, unpack_batch, loss_fn, user_step(step)),
                         MetricSet(metrics, accelerator.device), accelerator, watchdog)


@contextlib.contextmanager
def bounded(accelerator: Accelerator) -> Iterator[NoWatchdog]:
    """A watchdog for an evaluation or prediction outside `fit` (which has its own): a rank that stops making
    progress ends the job within the accelerator's bounds (launcher.faults.watchdog), as in training."""
    watchdog = start_watchdog(lambda: 0, getattr(accelerator, "launcher_timeouts", None) or Timeouts())
    try:
        yield watchdog
    finally:
        watchdog.close()


@torch.no_grad()
def _evaluate(model: torch.nn.Module, loader: Iterable, task: Task, compute: Callable[[Any, Any], BatchLoss],
              metrics: MetricSet, accelerator: Accelerator, watchdog: NoWatchdog = NO_WATCHDOG) -> Any:
    sampler = find_elastic_sampler(loader)
    elastic = sampler is not None
    stats = task.stats(accelerator.device)
    metrics.reset()
    was_training = model.training
    model.eval()
    with sampler.padded() if elastic else contextlib.nullcontext():
        _evaluate_batches(model, loader, sampler, compute, stats, metrics, accelerator, watchdog, task)
    model.train(was_training)
    result = stats.reduce()
    return result.with_extra(metrics.compute()) if metrics else result


def _evaluate_batches(model: torch.nn.Module, loader: Iterable, sampler: Any, compute: Callable, stats: Any,
                      metrics: MetricSet, accelerator: Accelerator, watchdog: NoWatchdog, task: Task) -> None:
    elastic = sampler is not None
    move = elastic and accelerator.device.type != "cpu"
    # The task's own per-sample loss drops padding after the forward (the batch keeps its shape); a model's
    # own mean loss or a custom step sees only the real samples of a padded batch.
    drops_padding = getattr(compute, "per_sample", False)
    remainder = last_batch_remainder(loader)
    # Without native AMP, accelerator.autocast() is a nullcontext; building it costs ~5 us per batch.
    autocast = accelerator.autocast if accelerator.native_amp else _no_autocast
    for k, batch in enumerate(iterate(loader) if elastic else loader):
        real = sampler.real_samples(k) if elastic else None  # None: every sample; else the first `real`
        if real and not drops_padding:
            batch, real = head_of_batch(batch, real), None
        if move:
            batch = send_to_device(batch, accelerator.device, non_blocking=True)
        with autocast():
            out = compute(model, batch)  # a padded rank runs it too: a sharded model's ranks stay in step
        watchdog.tick()
        n = samples_in(out)
        if elastic:
            valid = real
            if valid == 0:
                continue  # only padding (this rank's share of the last batch is empty): nothing counts
        else:
            is_last = getattr(loader, "end_of_dataloader", False)
            valid = valid_in_batch(is_last, remainder, n, accelerator.process_index) if n is not None else None
        stats.add_batch(out, valid)
        if metrics:
            metrics.update(*task.metric_inputs(out.outputs, out.targets), valid)
