"""`predict`: batch inference with the loop's machinery, every sample once, in dataset order."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, send_to_device

from launcher.data.sampling import find_elastic_sampler
from launcher.loop.batches import UnpackBatch, default_unpack, forward
from launcher.loop.evaluation import bounded
from launcher.tasks.base import Task


@torch.no_grad()
def predict(model: torch.nn.Module, loader: Any, task: Task, *, accelerator: Accelerator,
            unpack_batch: UnpackBatch = default_unpack) -> dict[str, list] | None:
    """The task's prediction rows (`index`, `label`, `prediction`, and `probabilities` where the task has
    them) of every sample of `loader`, on the main process (None elsewhere); every rank must call it.

    The loader must be built on an ElasticBatchSampler (launcher.data.make_loader, shuffle=False): it shards
    without padding, so each sample is predicted by one rank exactly once, and `index` is its row in the
    dataset. Rows are gathered to the main process as plain lists (per-sample predictions, never logits of
    a whole split on every rank).
    """
    sampler = find_elastic_sampler(loader)
    if sampler is None:
        raise ValueError("predict needs a loader from launcher.data.make_loader (an ElasticBatchSampler): a "
                         "loader Accelerate shards repeats samples to pad its last batch")
    dataset, collate = loader.dataset, loader.collate_fn
    move = accelerator.device.type != "cpu"
    columns: dict[str, list] = {"index": []}
    was_training = model.training
    model.eval()
    with bounded(accelerator) as watchdog, watchdog.evaluating(), sampler.padded():
        for k, indices in enumerate(loader.batch_sampler):
            batch = collate(dataset.__getitems__(list(indices)))
            if move:
                batch = send_to_device(batch, accelerator.device, non_blocking=True)
            inputs, targets = unpack_batch(batch)
            rows = task.prediction_rows(forward(model, inputs), targets)  # padded ranks too: in step
            watchdog.tick()
            real = sampler.real_samples(k)  # a padded last batch: its real samples come first
            real = len(indices) if real is None else real
            columns["index"].extend(int(i) for i in indices[:real])
            for name, values in rows.items():
                columns.setdefault(name, []).extend(values[:real])
    model.train(was_training)
    names = list(columns)
    local = list(zip(*(columns[n] for n in names)))
    everyone = gather_object(local) if accelerator.num_processes > 1 else local
    if not accelerator.is_main_process:
        return None
    everyone.sort(key=lambda row: row[0])
    return {name: [row[i] for row in everyone] for i, name in enumerate(names)}
