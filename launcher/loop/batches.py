"""Batches and model outputs: splitting a batch into inputs and targets, the forward pass, per-sample losses,
and which samples of a short last batch count.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping  # isinstance against typing.Mapping is several times slower, per batch
from typing import Any, Callable

import torch

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
