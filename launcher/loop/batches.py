"""Batches and model outputs: splitting a batch into inputs and targets, the forward pass, a batch's losses
(the task's, the model's own, or a custom step's), and which samples of a short last batch count.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping  # isinstance against typing.Mapping is several times slower, per batch
from typing import Any, Callable

import torch

from launcher.tasks.base import BatchLoss, LossTask, StepOutput, Task
from launcher.tasks.classification import SingleLabelClassification

Batch = Any


UnpackBatch = Callable[[Batch], tuple[Any, torch.Tensor]]


def default_unpack(batch: Batch) -> tuple[Any, torch.Tensor]:
    """Batches are `(inputs, targets)` pairs, or mappings with a 'label'/'labels' key.

    A mapping with one input besides the label gives that input (called positionally, as a pair's would
    be); with several (input_ids, attention_mask, ...), the mapping of them all, which `forward` hands to
    the model as keyword inputs.
    """
    if isinstance(batch, Mapping):
        label_key = "labels" if "labels" in batch else "label"
        if label_key not in batch:
            raise ValueError("a dict batch needs a 'label' or 'labels' key; pass unpack_batch= to fit to say "
                             "how to split it")
        inputs = {k: v for k, v in batch.items() if k != label_key}
        if not inputs:
            raise ValueError("a dict batch needs at least one input besides its labels")
        return (next(iter(inputs.values())) if len(inputs) == 1 else inputs), batch[label_key]
    inputs, targets = batch
    return inputs, targets


def forward(model: Callable, inputs: Any) -> torch.Tensor:
    """The logits of `model` on `inputs`: a mapping is passed as keyword inputs (model(**inputs))."""
    outputs = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    return outputs if type(outputs) is torch.Tensor else logits_of(outputs)


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits in a model's outputs: a tensor, a transformers ModelOutput or mapping with 'logits', or a
    tuple whose first element is the logits. The launcher computes its own loss from them and never uses a
    loss the model may have computed."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    if logits is None and isinstance(outputs, (tuple, list)) and outputs:
        logits = outputs[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"cannot find logits in model outputs of type {type(outputs).__name__}: return a "
                        f"tensor, an object or mapping with 'logits', or a tuple whose first element is them")
    return logits


def resolve_task(task: Task | None, loss_fn: Callable | str | None, num_classes: int | None,
                 step: Callable | None) -> Task:
    """The task of a fit/evaluate call: `task=`, or `num_classes=` (shorthand for single-label
    classification, today's callers), or a task known only by its per-sample `loss_fn` (LossTask)."""
    if step is not None and loss_fn is not None:
        raise ValueError("pass either loss_fn= or step= (a custom step computes its own loss), not both")
    own_loss = None if isinstance(loss_fn, str) else loss_fn
    if isinstance(loss_fn, str) and loss_fn != "model":
        raise ValueError(f"loss_fn={loss_fn!r}: a string must be 'model' (use the model's own loss)")
    if task is not None:
        if num_classes is not None and getattr(task, "num_classes", num_classes) != num_classes:
            raise ValueError(f"num_classes={num_classes} disagrees with the task's {task.num_classes}; pass one")
        if own_loss is not None:
            if not hasattr(task, "loss_fn"):
                raise ValueError(f"task {task.problem_type} has its own loss; drop loss_fn= or use step=")
            task = copy.copy(task)
            task.loss_fn = LossTask(own_loss).loss_fn  # reduction='none'
        return task
    if num_classes is not None:
        return SingleLabelClassification(num_classes, own_loss)
    if own_loss is None and loss_fn != "model" and step is None:
        raise ValueError("fit/evaluate need a loss: loss_fn= (per sample), loss_fn='model' (the model's own "
                         "loss), step= (a custom step), or a task= / num_classes=")
    return LossTask(own_loss)


def batch_losses(task: Task, unpack: UnpackBatch, loss_fn: Callable | str | None = None,
                 step: Callable | None = None) -> Callable[[Any, Batch], BatchLoss]:
    """`(model, batch) -> BatchLoss`: what one batch costs, in the form the loop weighs and the statistics add.

    - the task's loss (the default): forward, then per-sample losses (or per-sample sums and token counts);
    - `loss_fn='model'`: the labels go into the model (`model(**inputs, labels=targets)`, or
      `model(inputs, labels=targets)` for one input: transformers' convention) and its `outputs.loss`, a
      mean over samples (or over the task's valid tokens), is turned back into a sum;
    - `step(model, batch) -> StepOutput`: anything else (several outputs, several loss terms, contrastive).
    """
    if step is not None:
        def custom(model: Any, batch: Batch) -> BatchLoss:
            out = step(model, batch)
            if not isinstance(out, StepOutput):
                raise TypeError(f"step must return launcher.tasks.StepOutput(loss, count, outputs, targets), "
                                f"not {type(out).__name__}")
            loss = out.loss
            if loss.dim() > 1:
                raise ValueError(f"StepOutput.loss must be per-sample losses (N,) or one summed number, got shape "
                                 f"{tuple(loss.shape)}")
            if out.count is None:
                if loss.dim() == 0:
                    raise ValueError("StepOutput with a summed loss needs count= (how many items it sums over)")
                return BatchLoss(loss, torch.ones_like(loss), out.outputs, out.targets)
            return BatchLoss(loss, torch.as_tensor(out.count, device=loss.device), out.outputs, out.targets)

        custom.counts_items = True  # type: ignore[attr-defined]  # weighed by its count (loop.steps._CountWeights)
        return custom
    if loss_fn == "model":
        def own(model: Any, batch: Batch) -> BatchLoss:
            inputs, targets = unpack(batch)
            raw = model(**inputs, labels=targets) if isinstance(inputs, Mapping) else model(inputs, labels=targets)
            loss = raw.get("loss") if isinstance(raw, Mapping) else getattr(raw, "loss", None)
            if not isinstance(loss, torch.Tensor):
                raise ValueError(f"loss_fn='model': the model returned no 'loss' ({type(raw).__name__}); give it "
                                 f"labels it understands, or pass a loss_fn")
            outputs = logits_of(raw)
            if task.token_level:
                counts = task.count(targets)  # the model's loss is the mean over these tokens
                return BatchLoss(loss * counts, counts, outputs, targets)
            return BatchLoss(loss.expand(targets.shape[0]), None, outputs, targets)

        return own
    task_loss = task.loss

    def default(model: Any, batch: Batch) -> BatchLoss:
        inputs, targets = unpack(batch)
        outputs = forward(model, inputs)
        losses = task_loss(outputs, targets)
        if type(losses) is tuple:  # token-level: per-sample sums and counts
            return BatchLoss(losses[0], losses[1], outputs, targets)
        return BatchLoss(losses, None, outputs, targets)

    default.per_sample = True  # type: ignore[attr-defined]  # each sample's loss its own: padding drops after
    return default


def head_of_batch(batch: Batch, n: int) -> Batch:
    """The first `n` samples of a batch: every tensor with a batch dimension cut, in pairs, lists and mappings."""
    if isinstance(batch, torch.Tensor):
        return batch[:n] if batch.dim() else batch
    if isinstance(batch, Mapping):
        return {k: head_of_batch(v, n) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        values = [head_of_batch(v, n) for v in batch]
        return type(batch)(*values) if hasattr(batch, "_fields") else type(batch)(values)  # a namedtuple too
    return batch


def per_sample_loss_fn(loss_fn: Callable) -> Callable:
    """Per-sample losses from `loss_fn`: torch losses are copied with reduction='none'."""
    if getattr(loss_fn, "reduction", None) not in (None, "none"):
        loss_fn = copy.copy(loss_fn)
        loss_fn.reduction = "none"

    def per_sample(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses = loss_fn(outputs, targets)
        if losses.dim() != 1:
            raise ValueError("loss_fn must return one loss per sample (reduction='none'); exact metrics "
                             "need per-sample losses")
        return losses

    return per_sample


def last_batch_remainder(loader: Any) -> int:
    """Real samples in the last global batch of a prepared loader (0: the last batch is full).

    Computed from the original prepared loader: the one `skip_first_batches` builds for a resume does not
    know it.
    """
    try:
        if getattr(loader, "_drop_last", False):
            return 0
        return len(loader.dataset) % loader.total_batch_size
    except (TypeError, AttributeError):
        return 0


def valid_in_batch(is_last: bool, remainder: int, batch_size: int, rank: int) -> int | None:
    """How many samples of this batch are real, or None for all.

    With `even_batches`, Accelerate pads the last global batch with samples from the start of the dataset.
    In the gathered order (rank 0's batch, then rank 1's, ...) the first `remainder` are real; this is the
    same rule `gather_for_metrics` applies, without gathering anything.
    """
    if not is_last or remainder <= 0:
        return None
    return max(0, min(batch_size, remainder - rank * batch_size))


def _batch_len(targets: torch.Tensor) -> int:
    return int(targets.shape[0])


def samples_in(out: BatchLoss) -> int | None:
    """Samples in a batch: its targets', else its per-sample losses', else unknown (a custom step's sum)."""
    if isinstance(out.targets, torch.Tensor) and out.targets.dim():
        return int(out.targets.shape[0])
    return int(out.losses.shape[0]) if out.losses.dim() else None
