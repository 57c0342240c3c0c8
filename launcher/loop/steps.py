"""The training step: accumulate context, backward and optimizer step (Accelerate's or the plain fast path),
and the micro-batches of an ElasticBatchSampler epoch.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType, send_to_device

from launcher.data.sampling import ElasticBatchSampler, share
from launcher.loop.batches import Batch

_NO_CONTEXT = contextlib.nullcontext()


def _no_autocast() -> contextlib.nullcontext:
    return _NO_CONTEXT


def _plain_samples_done(loader: Any, batches_done: int) -> int:
    """The global position of a loader Accelerate prepared (its padding of the last batch not counted)."""
    try:
        return min(batches_done * loader.total_batch_size, len(loader.dataset))
    except (TypeError, AttributeError):
        return 0


class _ElasticFeed:
    """The micro-batches of an epoch from an ElasticBatchSampler, as the training loop consumes them.

    Every rank yields one batch per global batch, so they all run the same steps; a rank's share of a short
    last batch may be smaller than the others' (or empty). Per batch this decides:
    - the gradient weight: DDP averages the ranks' gradients, so rank r's loss is its samples' losses
      summed and scaled by world_size / (samples of the optimizer step, all ranks and micro-batches); when
      every share is full this is exactly the mean, computed as before (bit-identical);
    - whether the step ends here (every grad_accum batches and at the last one: Accelerate's own rule needs
      its prepared loader to know the end of the epoch);
    - the device copy (non-blocking; none on a CPU, where the loader's tensors already are).
    All of it is planned once per epoch: per batch the loop pays one list lookup.
    """

    def __init__(self, acc: Accelerator, sampler: ElasticBatchSampler, mean_backward: Callable) -> None:
        self.acc, self.sampler, self.mean_backward = acc, sampler, mean_backward
        self.world = sampler.world_size
        self.epoch_batches = sampler.batches_per_epoch
        self.move = acc.device.type != "cpu"
        self.no_sync = acc.num_processes > 1 and not acc.gradient_state.plugin_kwargs.get("sync_each_batch", False)
        self.plain = getattr(mean_backward, "plain", False)  # losses.backward(weights) is what acc.backward does
        self.plan = self._plan(sampler.global_sizes(), acc.gradient_accumulation_steps, sampler.start)
        self.position, self.index = sampler.start, -1
        self.scale: float | None = None
        self._weights: dict[tuple, torch.Tensor] = {}

    def _plan(self, sizes: list[int], accum: int, start: int) -> list[tuple[int, bool, float | None]]:
        """Per batch: (global position after it, ends an optimizer step, loss scale or None for the mean)."""
        plan, position = [], start
        for i, size in enumerate(sizes):
            position += size
            first = i - i % accum
            step_samples = sum(sizes[first: first + accum])
            local = share(size, self.sampler.rank, self.world)[1]
            full = local * self.world * accum == step_samples
            plan.append((position, (i + 1) % accum == 0 or i + 1 == len(sizes),
                         None if full else self.world * (1 if self.plain else accum) / step_samples))
        return plan

    def __len__(self) -> int:
        return len(self.plan)

    @property
    def is_last(self) -> bool:
        return self.index + 1 == len(self.plan)

    def next(self, batch: Batch) -> Batch:
        self.index += 1
        self.position, sync, self.scale = self.plan[self.index]
        if not self.plain:  # the plain path has set it once for good (one micro-batch per step)
            self.acc.sync_gradients = sync
        return send_to_device(batch, self.acc.device, non_blocking=True) if self.move else batch

    def accumulate(self, model: torch.nn.Module) -> Any:
        if self.acc.sync_gradients or not self.no_sync:
            return _NO_CONTEXT
        return self.acc.no_sync(model)

    def backward(self, losses: torch.Tensor) -> None:
        scale = self.scale
        if scale is None:
            self.mean_backward(losses)  # every share full: the mean, exactly as without the sampler
        elif self.plain:
            key = (losses.shape[0], losses.dtype, losses.device, scale)
            weight = self._weights.get(key)
            if weight is None:
                weight = self._weights[key] = torch.full_like(losses, scale)
            losses.backward(weight)
        else:
            # accelerator.backward divides by grad_accum (the scale has it); an empty share still
            # backpropagates (zeros) so that DDP's gradient all-reduce runs on every rank.
            self.acc.backward(losses.sum() * scale)


# Where Accelerate's backward and optimizer wrappers do nothing beyond forwarding when there is no scaler.
_PLAIN_TYPES = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


def _step_functions(acc: Accelerator, optimizer: Any) -> tuple[Callable, Callable, Callable[[], None]]:
    """(accumulate context, backward of the mean of per-sample losses, optimizer step + zero_grad).

    Accelerate's own, except where they compute exactly `losses.mean().backward(); opt.step();
    opt.zero_grad()`: one micro-batch per step, no GradScaler (fp16), no LOMO optimizer, and DDP or a
    single process. There the wrappers only add cost: AcceleratedOptimizer.step searches sys.path for the
    optional `lomo_optim` package twice per call (importlib.util.find_spec) and zero_grad inspects the
    optimizer's signature per call, together about 65 us per step on a 2-core CPU, a fifth of a small MLP's
    step (bench/RESULTS.md). With gradient accumulation, fp16, FSDP, DeepSpeed or XLA everything goes
    through Accelerate as before.
    """
    if (acc.gradient_accumulation_steps == 1 and acc.scaler is None and not acc.has_lomo_optimizer
            and acc.distributed_type in _PLAIN_TYPES and type(optimizer) is AcceleratedOptimizer):
        acc.sync_gradients = True  # what accumulate() sets on every batch when there is nothing to accumulate
        inner = optimizer.optimizer

        def plain_step() -> None:
            inner.step()
            inner.zero_grad(set_to_none=True)

        return lambda model: _NO_CONTEXT, _mean_backward(), plain_step

    def step() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return acc.accumulate, lambda losses: acc.backward(losses.mean()), step


def _mean_backward() -> Callable[[torch.Tensor], None]:
    """`losses.mean().backward()` without the mean: the gradient the mean's backward hands down (1/n for
    every sample, computed the same way, so bit-identical) is fed to the per-sample losses directly. One
    op and one autograd node less per step, about 7 us on a 2-core CPU."""
    grads: dict[tuple, torch.Tensor] = {}

    def backward(losses: torch.Tensor) -> None:
        key = (losses.shape[0], losses.dtype, losses.device)  # losses are 1-D (per_sample_loss_fn)
        grad = grads.get(key)
        if grad is None:
            grad = grads[key] = torch.ones_like(losses) / losses.numel()
        losses.backward(grad)

    backward.plain = True  # type: ignore[attr-defined]  # _ElasticFeed may call losses.backward(weights) too
    return backward


class _CountWeights:
    """Weights for losses known as a sum and a count (token-level tasks, the model's own token loss, custom
    steps): every item of an optimizer step weighs the same, across micro-batches and processes.

    The count of an accumulation window is only known once its last micro-batch ran, so each micro-batch
    backpropagates its plain sum and, at the step boundary, the gradients are multiplied by
    world_size / (the window's count summed over all processes): DDP's mean of the ranks' sums then equals
    the global sum over the global count, i.e. one process on the whole global batch. The count is
    all-reduced on the device (no host read), as torchtitan's global_valid_tokens and transformers'
    num_items_in_batch are; the multiply is one foreach op.
    """

    def __init__(self, acc: Accelerator, model: torch.nn.Module, plain: bool) -> None:
        self.acc, self.plain = acc, plain
        self.world = acc.num_processes
        self.window = torch.zeros((), dtype=torch.float32 if acc.device.type == "mps" else torch.float64,
                                  device=acc.device)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def backward(self, loss_sum: torch.Tensor, counts: torch.Tensor) -> None:
        self.window.add_(counts.sum())
        if self.plain:
            loss_sum.sum().backward()
        else:  # accelerator.backward divides by grad_accum (and scales for fp16): undo the division
            self.acc.backward(loss_sum.sum() * self.acc.gradient_accumulation_steps)

    def rescale(self) -> None:
        """At an optimizer-step boundary, after the gradients were all-reduced and before clipping."""
        total = self.window.clone()
        self.window.zero_()
        if self.world > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
        grads = [getattr(p.grad, "_local_tensor", p.grad) for p in self.params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, (self.world / total.clamp(min=1)).to(grads[0].dtype))
