"""Exact validation metrics (`evaluate`), all-reduced once."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device

from launcher.data.sampling import find_elastic_sampler, iterate
from launcher.loop.accelerator import make_accelerator
from launcher.loop.batches import (
    UnpackBatch,
    _batch_len,
    default_unpack,
    forward,
    last_batch_remainder,
    per_sample_loss_fn,
    valid_in_batch,
)
from launcher.loop.steps import _no_autocast
from launcher.tasks.classification import ClassificationMetrics, ConfusionStats


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable, loss_fn: Callable, *, num_classes: int,
             accelerator: Accelerator | None = None, unpack_batch: UnpackBatch = default_unpack,
             prepare: bool = False) -> ClassificationMetrics:
    """Exact validation metrics, all-reduced once. Every rank must call this.

    Pass `prepare=True` for a model/loader that Accelerate has not prepared yet.
    """
    accelerator = accelerator or make_accelerator()
    elastic = find_elastic_sampler(loader) is not None  # sharded by its sampler: Accelerate must not re-shard it
    if prepare:
        model, loader = (accelerator.prepare(model), loader) if elastic else accelerator.prepare(model, loader)
    move = elastic and accelerator.device.type != "cpu"
    per_sample = per_sample_loss_fn(loss_fn)
    stats = ConfusionStats(num_classes, accelerator.device)
    was_training = model.training
    remainder = last_batch_remainder(loader)
    # Without native AMP, accelerator.autocast() is a nullcontext; building it costs ~5 us per batch.
    autocast = accelerator.autocast if accelerator.native_amp else _no_autocast
    model.eval()
    for batch in iterate(loader) if elastic else loader:
        if move:
            batch = send_to_device(batch, accelerator.device, non_blocking=True)
        inputs, targets = unpack_batch(batch)
        with autocast():
            outputs = forward(model, inputs)
            losses = per_sample(outputs, targets)
        is_last = getattr(loader, "end_of_dataloader", False)
        stats.update(losses.float(), outputs, targets,
                     valid_in_batch(is_last, remainder, _batch_len(targets), accelerator.process_index))
    model.train(was_training)
    return stats.reduce()
