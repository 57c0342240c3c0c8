"""Parameters the loss never reaches, found before training, and the DDP options that follow from them.

DDP expects a gradient for every trainable parameter in every step; a parameter the loss does not reach (a
pooler a custom head skips, a mask token used only in pre-training, an auxiliary head) makes the second
step fail with torch's "Expected to have finished reduction in the prior iteration". DDP copes when it is
built with `find_unused_parameters=True` (it walks the autograd graph every step, which costs a little), or
with `static_graph=True` when the set of used parameters is the same in every step. `configure_ddp` decides
before Accelerate wraps the model: one forward and backward on one training batch says which parameters get
no gradient, and the DDP options are set on the accelerator (`accelerator.ddp_handler`, which
`Accelerator.prepare` reads) only when needed.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, send_to_device

from launcher.checkpoint import capture_rng, restore_rng

MODES = ("auto", "on", "off", "static")
_DDP_TYPES = tuple(t for t in DistributedType if t.name.startswith("MULTI_"))  # the types Accelerate wraps in DDP
_NAMED = 4  # parameters named in the notice


def configure_ddp(accelerator: Accelerator, model: torch.nn.Module, loader: Any, batch_loss: Callable,
                  mode: str | bool = "auto") -> list[str]:
    """Set DDP's unused-parameter options on `accelerator` before it prepares `model`. Every rank calls this.

    mode: 'auto' (probe, and turn find_unused_parameters on only if some parameter gets no gradient), 'on'
    / True, 'off' / False, or 'static' (static_graph=True: the same parameters are used in every step).
    batch_loss(model, batch) is the loop's scalar training loss of a batch already on the device.
    Returns the unused parameters found by the probe (empty without one).
    """
    mode = {True: "on", False: "off"}.get(mode, mode)
    if mode not in MODES:
        raise ValueError(f"find_unused_parameters must be one of {', '.join(MODES)} (got {mode!r})")
    if (mode == "off" or accelerator.num_processes < 2 or accelerator.distributed_type not in _DDP_TYPES
            or isinstance(model, torch.nn.parallel.DistributedDataParallel)):  # already wrapped: too late
        return []
    handler = accelerator.ddp_handler or DistributedDataParallelKwargs()
    unused: list[str] = []
    if mode == "static":
        handler.static_graph = True
    elif mode == "on":
        handler.find_unused_parameters = True
    else:
        unused = unused_parameters(model, first_batch(loader), batch_loss, accelerator)
        # Every rank must build DDP alike; a data-dependent model may leave parameters unused on one only.
        anywhere = accelerator.reduce(torch.tensor([float(bool(unused))], device=accelerator.device), "sum")
        if anywhere.item() == 0:
            return []
        handler.find_unused_parameters = True
        shown = ", ".join(unused[:_NAMED]) + (f" and {len(unused) - _NAMED} more" if len(unused) > _NAMED else "")
        accelerator.print(f"unused parameters: the loss does not reach {shown or 'some parameters on another rank'}"
                          f"; DDP runs with find_unused_parameters=True (--find-unused-parameters off|on|static "
                          f"decides it yourself)")
    accelerator.ddp_handler = handler
    return unused


def first_batch(loader: Any) -> Any:
    """The loader's first batch in dataset order, built without an iterator: no worker processes start and
    no shuffle order is drawn from the RNG."""
    dataset = getattr(loader, "dataset", None)
    # A DataLoader built on a batch sampler (launcher.data.sampling) has batch_size None; its sampler has one.
    batch_size = getattr(loader, "batch_size", None) or getattr(getattr(loader, "batch_sampler", None),
                                                                "batch_size", None)
    if dataset is None or not batch_size or not hasattr(dataset, "__len__"):
        return next(iter(loader))
    indices = list(range(min(batch_size, len(dataset))))
    getitems = getattr(dataset, "__getitems__", None)
    samples = getitems(indices) if getitems is not None else [dataset[i] for i in indices]
    return loader.collate_fn(samples)


def unused_parameters(model: torch.nn.Module, batch: Any, batch_loss: Callable, accelerator: Accelerator) -> list[str]:
    """Names of trainable parameters that get no gradient from one training-mode forward and backward of
    the loop's loss on `batch` (`batch_loss(model, batch)`). Weights, gradients, buffers (batch-norm
    statistics), train/eval mode and the RNG streams are left as they were, so training starts exactly as
    without the probe."""
    model.to(accelerator.device)  # where prepare() puts it anyway; before the RNG capture, which covers CUDA
    batch = send_to_device(batch, accelerator.device)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    grads = {name: p.grad for name, p in model.named_parameters()}
    was_training, rng = model.training, capture_rng()
    try:
        for p in model.parameters():
            p.grad = None
        model.train()
        with accelerator.autocast():
            loss = batch_loss(model, batch)
        loss.backward()
        return [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    finally:
        restore_rng(rng)
        model.train(was_training)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        for name, p in model.named_parameters():
            p.grad = grads[name]
