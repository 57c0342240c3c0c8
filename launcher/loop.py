"""The epoch loop: written once, run unchanged on CPU, one GPU, many GPUs and many nodes.

`fit` lets Accelerate prepare the model, optimizer, dataloaders and scheduler, then trains and validates
the way a careful practitioner does: train()/eval() modes, no gradients in evaluation, gradient
accumulation through `accelerator.accumulate`, clipping on real optimizer steps, mixed precision from the
accelerate config, LR scheduling, early stopping decided from all-reduced metrics (so every rank agrees).

Nothing is read back to the host per step: losses and confusion counts accumulate on the device and are
read once per log interval and once per epoch. The only per-step collective is the preemption vote, which
runs asynchronously on a CPU group (see launcher.preemption).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
import warnings
from dataclasses import dataclass
from collections.abc import Mapping  # isinstance against typing.Mapping is several times slower, per batch
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DataLoaderConfiguration, DistributedType
from torch.optim.lr_scheduler import ReduceLROnPlateau
from tqdm.auto import tqdm

from launcher.checkpoint import (
    CheckpointManager,
    TrainerState,
    checkpoint_name,
    load_checkpoint,
    restore_rng,
    save_weights,
    write_json_atomic,
    write_text_atomic,
)
from launcher.errors import EXIT_PREEMPTED
from launcher.fsdp import check_distributed, launcher_shards, shard_model
from launcher.metrics import ClassificationMetrics, ConfusionStats
from launcher.preemption import PreemptionWatch
from launcher.sharded import check_resume_format, full_model_state, is_sharded_checkpoint, is_sharded_model, \
    load_sharded, save_sharded
from launcher.tracking import NullTracker, Tracker

Batch = Any
UnpackBatch = Callable[[Batch], tuple[Any, torch.Tensor]]


class Preempted(SystemExit):
    """Raised by `fit` after a preemption checkpoint is saved; exits the process with EXIT_PREEMPTED."""

    def __init__(self, checkpoint: Path | None):
        super().__init__(EXIT_PREEMPTED)
        self.checkpoint = checkpoint


def make_accelerator(*, grad_accum: int = 1, seed: int | None = None, **kwargs: Any) -> Accelerator:
    """The Accelerator `fit` expects; mixed precision and topology come from `accelerate launch`.

    - On a machine without a GPU, `cpu=True` makes each process of a multi-process launch join a gloo
      group (otherwise every process silently trains alone as world size 1).
    - `use_seedable_sampler`: the shuffle order of epoch e is a function of (seed, e), which is what makes
      mid-epoch resume exact.
    - `step_scheduler_with_optimizer=False`: `fit` steps schedules once per optimizer step.
    - `non_blocking`: batches are copied to the GPU asynchronously. A blocking copy synchronizes the host
      with the GPU's stream on every batch, so the CPU could never run ahead of the GPU (pair it with
      `pin_memory=True` in the DataLoader, as launcher.data.make_loader does when CUDA is available).
    """
    kwargs.setdefault("cpu", not (torch.cuda.is_available() or _has_other_accelerator()))
    kwargs.setdefault("dataloader_config", DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed,
                                                                   non_blocking=True))
    accelerator = Accelerator(gradient_accumulation_steps=grad_accum, step_scheduler_with_optimizer=False, **kwargs)
    check_distributed(accelerator)  # never a silent downgrade (e.g. an FSDP config running as DDP)
    return accelerator


def _has_other_accelerator() -> bool:
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return bool((mps and mps.is_available()) or (xpu and xpu.is_available()))


def default_unpack(batch: Batch) -> tuple[Any, torch.Tensor]:
    """Batches are `(inputs, targets)` pairs, or mappings with a 'label'/'labels' key and one input key."""
    if isinstance(batch, Mapping):
        label_key = "labels" if "labels" in batch else "label"
        inputs = [v for k, v in batch.items() if k != label_key]
        if label_key not in batch or len(inputs) != 1:
            raise ValueError("a dict batch needs a 'label' or 'labels' key and exactly one input; "
                             "pass unpack_batch= to fit to say how to split it")
        return inputs[0], batch[label_key]
    inputs, targets = batch
    return inputs, targets


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


def _better(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best + min_delta if mode == "max" else value < best - min_delta


_NO_CONTEXT = contextlib.nullcontext()


def _no_autocast() -> contextlib.nullcontext:
    return _NO_CONTEXT


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable, loss_fn: Callable, *, num_classes: int,
             accelerator: Accelerator | None = None, unpack_batch: UnpackBatch = default_unpack,
             prepare: bool = False) -> ClassificationMetrics:
    """Exact validation metrics, all-reduced once. Every rank must call this.

    Pass `prepare=True` for a model/loader that Accelerate has not prepared yet.
    """
    accelerator = accelerator or make_accelerator()
    if prepare:
        model, loader = accelerator.prepare(model, loader)
    per_sample = per_sample_loss_fn(loss_fn)
    stats = ConfusionStats(num_classes, accelerator.device)
    was_training = model.training
    remainder = last_batch_remainder(loader)
    # Without native AMP, accelerator.autocast() is a nullcontext; building it costs ~5 us per batch.
    autocast = accelerator.autocast if accelerator.native_amp else _no_autocast
    model.eval()
    for batch in loader:
        inputs, targets = unpack_batch(batch)
        with autocast():
            outputs = model(inputs)
            losses = per_sample(outputs, targets)
        is_last = getattr(loader, "end_of_dataloader", False)
        stats.update(losses.float(), outputs, targets,
                     valid_in_batch(is_last, remainder, _batch_len(targets), accelerator.process_index))
    model.train(was_training)
    return stats.reduce()


@dataclass
class FitRun:
    """Everything one `fit` call works with, so the loop below reads as steps rather than bookkeeping.

    The first block is fixed once Accelerate has prepared the objects; `state` is what a checkpoint saves;
    the last block is transient per-launch bookkeeping that no checkpoint holds.
    """

    # Prepared objects and options, fixed for the whole call.
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared (DDP-wrapped etc.); accelerator.unwrap_model gives the plain one
    optimizer: Any  # accelerate's AcceleratedOptimizer
    plateau: ReduceLROnPlateau | None  # stepped once per epoch with the monitored metric
    step_sched: Any  # accelerate-wrapped per-step scheduler (None with plateau or no schedule)
    per_sample: Callable[[Any, torch.Tensor], torch.Tensor]  # per-sample losses of (outputs, targets)
    num_classes: int
    unpack: UnpackBatch
    max_grad_norm: float | None
    log_every: int  # optimizer steps between training-loss logs
    tracker: Tracker
    progress: bool  # show a progress bar on each node's local main process
    save_every_steps: int | None
    output_dir: Path | None  # None: nothing is written
    # What a checkpoint saves and a resume restores.
    state: TrainerState
    # Per-launch bookkeeping.
    manager: CheckpointManager | None = None  # None when output_dir is None
    rng_to_restore: dict | None = None  # a mid-epoch resume restores the RNG after the loader's first draw
    resumed_stats: dict | None = None  # partial-epoch training statistics of this rank, from the checkpoint
    last_checkpoint: Path | None = None  # the folder the latest save wrote
    train_metrics: ClassificationMetrics | None = None  # of the epoch just trained, all-reduced
    log_mark: tuple[float, int, float, float] = (0.0, 0, 0.0, 0.0)  # (time, samples, loss sum, seen) at last log


def fit(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: Iterable,
    val_loader: Iterable,
    loss_fn: Callable,
    *,
    epochs: int,
    num_classes: int,
    accelerator: Accelerator | None = None,
    scheduler: Callable | None = None,
    grad_accum: int = 1,
    max_grad_norm: float | None = None,
    seed: int | None = None,
    best_metric: str = "val_accuracy",
    best_mode: str = "max",
    early_stopping_patience: int | None = None,
    min_delta: float = 0.0,
    output_dir: str | Path | None = None,
    save_every_steps: int | None = None,
    keep_last: int = 3,
    resume_from: str | Path | None = None,
    config: Mapping[str, Any] | None = None,
    extra_state: Mapping[str, Any] | None = None,
    log_every: int = 50,
    tracker: Tracker | None = None,
    progress: bool = True,
    unpack_batch: UnpackBatch = default_unpack,
) -> list[dict]:
    """Train `model` for `epochs`, validating after each; returns one metrics row per epoch.

    model, optimizer, loaders: plain PyTorch objects; `fit` prepares them with Accelerate.
    loss_fn: e.g. `nn.CrossEntropyLoss()`; fit uses per-sample losses (reduction='none') for exact metrics.
    num_classes: size of the confusion matrix.
    accelerator: defaults to `make_accelerator(grad_accum=grad_accum, seed=seed)`.
    scheduler: a factory `(optimizer, total_optimizer_steps) -> scheduler` (see launcher.schedulers);
        per-step schedules step after every optimizer step, ReduceLROnPlateau after every epoch with
        `best_metric`.
    max_grad_norm: clip the global gradient norm on every optimizer step (None: no clipping).
    best_metric / best_mode: the validation metric (a key of the rows, e.g. val_accuracy, val_loss) that
        early stopping, ReduceLROnPlateau and `checkpoints/best` follow.
    early_stopping_patience: stop after this many epochs without an improvement of more than min_delta.
    output_dir: where metrics.jsonl, checkpoints/ and final/ go (None: keep nothing on disk).
    save_every_steps: also checkpoint every N optimizer steps; keep_last: checkpoints kept besides best.
    resume_from: a checkpoint folder to continue from exactly (see launcher.checkpoint.resolve_resume).
    config / extra_state: plain data stored in every checkpoint (extra_state: e.g. the W&B run id).
    log_every: training-loss log interval in optimizer steps (passed to tracker.log_train).
    Raises `Preempted` (a SystemExit with code 75) after saving a checkpoint on SIGTERM/SIGUSR1.
    """
    accelerator = accelerator or make_accelerator(grad_accum=grad_accum, seed=seed)
    if scheduler is not None and accelerator.step_scheduler_with_optimizer:
        raise ValueError("fit steps the scheduler itself: build the Accelerator with "
                         "step_scheduler_with_optimizer=False (launcher.make_accelerator does)")
    tracker = tracker if tracker is not None else NullTracker()
    if launcher_shards(accelerator):  # an FSDP config on CPU: the launcher applies FSDP2 (launcher.fsdp)
        model = shard_model(accelerator, model, optimizer)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.gradient_accumulation_steps)
    sched = scheduler(optimizer.optimizer, steps_per_epoch * epochs) if scheduler else None
    plateau = sched if isinstance(sched, ReduceLROnPlateau) else None
    step_sched = accelerator.prepare_scheduler(sched) if sched is not None and plateau is None else None

    run = FitRun(
        accelerator=accelerator, model=model, optimizer=optimizer, plateau=plateau, step_sched=step_sched,
        per_sample=per_sample_loss_fn(loss_fn), num_classes=num_classes, unpack=unpack_batch,
        max_grad_norm=max_grad_norm, log_every=log_every, tracker=tracker, progress=progress,
        save_every_steps=save_every_steps, output_dir=Path(output_dir) if output_dir else None,
        state=TrainerState(world_size=accelerator.num_processes, config=dict(config or {}),
                           extra=dict(extra_state or {})),
    )
    if run.output_dir is not None:
        if accelerator.is_main_process:
            run.output_dir.mkdir(parents=True, exist_ok=True)
        run.manager = CheckpointManager(run.output_dir, keep_last=keep_last, is_main=accelerator.is_main_process)
        run.manager.clean_stale()
    if resume_from is not None:
        _resume(run, Path(resume_from))

    watch = PreemptionWatch()
    exit_code = 1
    try:
        while run.state.epoch < epochs:
            epoch = run.state.epoch
            if not _train_epoch(run, train_loader, epoch, epochs, watch):
                _save(run, reason="preempted")
                exit_code = EXIT_PREEMPTED
                raise Preempted(run.last_checkpoint)
            row = _validate_and_record(run, val_loader, epoch, best_metric)
            stop_early = _update_best_and_patience(run, row, best_metric, best_mode, min_delta,
                                                   early_stopping_patience)
            if run.plateau is not None:
                run.plateau.step(row[best_metric])
            run.state.epoch, run.state.batches_done = epoch + 1, 0
            run.state.train_stats, run.state.epoch_seconds, run.state.train_seconds = None, 0.0, 0.0
            _save(run, reason="epoch", best=row["epoch"] == run.state.best_epoch)
            if stop_early:
                accelerator.print(f"early stopping: {best_metric} has not improved for "
                                  f"{run.state.bad_epochs} epochs")
                break
            if watch.should_stop() and run.state.epoch < epochs:
                exit_code = EXIT_PREEMPTED
                raise Preempted(run.last_checkpoint)
        _write_final(run)
        exit_code = 0
        return run.state.history
    finally:
        watch.close()
        tracker.finish(run.state.history, exit_code)
        if exit_code == EXIT_PREEMPTED and dist.is_available() and dist.is_initialized():
            # The process is about to exit: leave together and tear the group down, so that no rank drops
            # a connection a peer still uses and torchrun's exit barrier is clean.
            dist.barrier()
            dist.destroy_process_group()


def _resume(run: FitRun, path: Path) -> None:
    acc = run.accelerator
    check_resume_format(path, sharded_run=is_sharded_model(run.model))
    load = load_sharded if is_sharded_checkpoint(path) else load_checkpoint  # DCP reshards: any world size
    state, rng, stats = load(
        path, model=acc.unwrap_model(run.model), optimizer=run.optimizer,
        scheduler=run.step_sched.scheduler if run.step_sched is not None else run.plateau,
        scaler=acc.scaler, rank=acc.process_index)
    if state.world_size != acc.num_processes:
        if state.batches_done:
            # Per-process positions do not map one-to-one onto another world size: redo the epoch.
            warnings.warn(f"checkpoint {path} was written by {state.world_size} processes, this run has "
                          f"{acc.num_processes}: the interrupted epoch restarts from its beginning and the "
                          f"result is not bit-identical to an uninterrupted run", stacklevel=3)
            state.batches_done, state.train_stats, state.epoch_seconds = 0, None, 0.0
            state.train_seconds = 0.0
            stats = None
        rng = None
    run.state = TrainerState(**{**state.__dict__, "world_size": acc.num_processes,
                                "config": run.state.config or state.config,
                                "extra": {**state.extra, **run.state.extra}})
    run.rng_to_restore, run.resumed_stats = rng, stats
    if rng is not None and run.state.batches_done == 0:
        restore_rng(rng)  # the next epoch starts exactly where the saved run would have started it
        run.rng_to_restore = None
    if run.output_dir is not None and acc.is_main_process:
        _rewrite_metrics(run.output_dir, run.state.history)
    acc.print(f"resumed from {path} (epoch {run.state.epoch + 1}, step {run.state.global_step}, "
              f"{run.state.batches_done} batches into the epoch)")


def _train_epoch(run: FitRun, train_loader: Any, epoch: int, epochs: int, watch: PreemptionWatch) -> bool:
    """Train one epoch (or its rest after a resume). Returns False when the ranks agreed to stop."""
    acc, model, optimizer, state = run.accelerator, run.model, run.optimizer, run.state
    stats = ConfusionStats(run.num_classes, acc.device)
    if run.resumed_stats is not None:
        stats.load_state_dict(run.resumed_stats)
        run.resumed_stats = None
    train_loader.set_epoch(epoch)  # epoch e shuffles with (seed, e): the same order after a resume
    loader = acc.skip_first_batches(train_loader, state.batches_done) if state.batches_done else train_loader
    total_batches = len(train_loader)
    remainder = last_batch_remainder(train_loader)
    bar = tqdm(total=total_batches, initial=state.batches_done, desc=f"epoch {epoch + 1}/{epochs}",
               disable=not (run.progress and acc.is_local_main_process), leave=False, dynamic_ncols=True)
    accumulate, backward, step = _step_functions(acc, optimizer)
    clock = _EpochClock(state)
    run.log_mark = (time.perf_counter(), 0, 0.0, 0.0)
    model.train()
    for batch in loader:
        if run.rng_to_restore is not None:
            # Resumed mid-epoch: creating the iterator drew from the global RNG; now continue the saved
            # stream exactly where the interrupted run was.
            restore_rng(run.rng_to_restore)
            run.rng_to_restore = None
        inputs, targets = run.unpack(batch)
        with accumulate(model):
            outputs = model(inputs)
            losses = run.per_sample(outputs, targets)
            backward(losses)
            if acc.sync_gradients and run.max_grad_norm:
                acc.clip_grad_norm_(model.parameters(), run.max_grad_norm)
            step()
        valid = valid_in_batch(state.batches_done + 1 == total_batches, remainder, _batch_len(targets),
                               acc.process_index)
        stats.update(losses.float(), outputs, targets, valid)
        clock.samples += _batch_len(targets) if valid is None else valid
        state.batches_done += 1
        bar.update(1)
        if not acc.sync_gradients:
            continue
        # An optimizer step boundary: the only place where state is consistent enough to save.
        if run.step_sched is not None and not acc.optimizer_step_was_skipped:
            run.step_sched.step()
        state.global_step += 1
        if state.global_step % run.log_every == 0:
            _log_train(run, stats, clock, epoch + state.batches_done / total_batches, bar)
        if state.batches_done == total_batches:
            continue  # the epoch-end checkpoint covers it; no break, so Accelerate's loader closes itself
        if watch.should_stop():
            clock.snapshot(stats)
            bar.close()
            return False
        if should_save_step(state.global_step, run.save_every_steps):
            clock.snapshot(stats)
            _save(run, reason="step")
    bar.close()
    run.train_metrics = stats.reduce()
    clock.snapshot(None)
    return True


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

    return backward


def should_save_step(global_step: int, save_every_steps: int | None) -> bool:
    """Mid-epoch saves; epoch ends and preemption always save (see fit)."""
    return bool(save_every_steps) and global_step % save_every_steps == 0


class _EpochClock:
    """Time and samples of the epoch in progress, including what a resumed checkpoint had already spent."""

    def __init__(self, state: TrainerState):
        self.state = state
        self.started = time.perf_counter()
        self.base_epoch, self.base_train = state.epoch_seconds, state.train_seconds
        self.samples = 0

    def snapshot(self, stats: ConfusionStats | None) -> None:
        elapsed = time.perf_counter() - self.started
        self.state.epoch_seconds = self.base_epoch + elapsed
        self.state.train_seconds = self.base_train + elapsed
        self.state.train_stats = stats.state_dict() if stats is not None else None


def _log_train(run: FitRun, stats: ConfusionStats, clock: _EpochClock, epoch_progress: float, bar: Any) -> None:
    """One host read per log interval: this process's mean training loss since the last log."""
    acc, c = run.accelerator, run.num_classes
    loss_sum, seen = torch.stack([stats.buffer[-1], stats.buffer[: c * c].sum()]).tolist()
    mark_time, mark_samples, mark_loss, mark_seen = run.log_mark
    now = time.perf_counter()
    loss = (loss_sum - mark_loss) / max(seen - mark_seen, 1.0)
    lr = run.optimizer.param_groups[0]["lr"]
    rate = (clock.samples - mark_samples) * acc.num_processes / max(now - mark_time, 1e-9)
    run.tracker.log_train(run.state.global_step, {"loss": loss, "lr": lr, "samples_per_second": rate,
                                                  "epoch": epoch_progress})
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
    run.log_mark = (now, clock.samples, loss_sum, seen)


def _validate_and_record(run: FitRun, val_loader: Any, epoch: int, best_metric: str) -> dict:
    acc, state = run.accelerator, run.state
    started = time.perf_counter()
    val = evaluate(run.model, val_loader, run.per_sample, num_classes=run.num_classes, accelerator=acc,
                   unpack_batch=run.unpack)
    row = {
        "epoch": epoch + 1,
        "step": state.global_step,
        "train_loss": run.train_metrics.loss,
        "train_accuracy": run.train_metrics.accuracy,
        **val.as_row("val"),
        "lr": run.optimizer.param_groups[0]["lr"],
        "epoch_seconds": state.epoch_seconds + time.perf_counter() - started,  # train + validation
        # Exact global count of trained samples over this process's training time (ranks run in step).
        "samples_per_second": run.train_metrics.samples / state.train_seconds if state.train_seconds else 0.0,
        "world_size": acc.num_processes,
    }
    if best_metric not in row:
        raise ValueError(f"best_metric {best_metric!r} is not a metric; choose one of "
                         f"{', '.join(k for k in row if k.startswith('val_') and k != 'val_confusion_matrix')}")
    state.history.append(row)
    if acc.is_main_process:
        if run.output_dir is not None:
            with open(run.output_dir / "metrics.jsonl", "a") as f:
                f.write(_json_line(row))
        summary = (f"epoch {row['epoch']}: train_loss {row['train_loss']:.4f} "
                   f"train_acc {row['train_accuracy']:.4f} | val_loss {row['val_loss']:.4f} "
                   f"val_acc {row['val_accuracy']:.4f} val_f1 {row['val_f1']:.4f} | lr {row['lr']:.2e} "
                   f"| {row['epoch_seconds']:.1f}s, {row['samples_per_second']:.0f} samples/s")
        tqdm.write(summary)
    run.tracker.log_epoch(row)
    return row


def _update_best_and_patience(run: FitRun, row: dict, best_metric: str, mode: str, min_delta: float,
                              patience: int | None) -> bool:
    state = run.state
    if _better(row[best_metric], state.best_value, mode, min_delta):
        state.best_value, state.best_epoch, state.bad_epochs = row[best_metric], row["epoch"], 0
    else:
        state.bad_epochs += 1
    return patience is not None and state.bad_epochs >= patience


def _save(run: FitRun, *, reason: str, best: bool = False) -> None:
    """Write a checkpoint (every rank calls this); at epoch ends, also maintain best/ and rotation."""
    run.last_checkpoint = None
    if run.manager is None:
        return
    acc, state = run.accelerator, run.state
    state.reason = reason
    if best:
        state.best_checkpoint = checkpoint_name(state.global_step)
    scheduler = run.step_sched.scheduler if run.step_sched is not None else run.plateau
    if is_sharded_model(run.model):  # every rank writes its own shards (launcher.sharded)
        path = save_sharded(run.manager, state, model=acc.unwrap_model(run.model), optimizer=run.optimizer,
                            scheduler=scheduler, scaler=acc.scaler)
    else:
        path = run.manager.save(state, model_state=acc.get_state_dict(run.model), optimizer=run.optimizer,
                                scheduler=scheduler, scaler=acc.scaler)
    run.last_checkpoint = path
    if best:
        run.manager.mark_best(path.name)
    run.manager.rotate(protect=state.best_checkpoint)


def _write_final(run: FitRun) -> None:
    """final/model.safetensors: the weights at the end of training, written atomically by rank 0."""
    acc = run.accelerator
    acc.wait_for_everyone()
    if run.output_dir is None:
        return
    # Under FSDP the whole model exists only here, once, gathered onto rank 0's CPU.
    weights = full_model_state(acc.unwrap_model(run.model)) if is_sharded_model(run.model) \
        else acc.get_state_dict(run.model)
    if acc.is_main_process:
        final = run.output_dir / "final"
        final.mkdir(parents=True, exist_ok=True)
        tmp = final / ".model.safetensors.tmp"
        save_weights(weights, tmp)
        tmp.replace(final / "model.safetensors")
        write_json_atomic(final / "trainer_state.json", {"history": run.state.history, "config": run.state.config,
                                                         "global_step": run.state.global_step})
    acc.wait_for_everyone()


def _json_line(row: Mapping[str, Any]) -> str:
    return json.dumps(row) + "\n"


def _rewrite_metrics(output_dir: Path, history: list[dict]) -> None:
    """After a resume metrics.jsonl holds exactly the checkpoint's epochs (atomically replaced)."""
    write_text_atomic(output_dir / "metrics.jsonl", "".join(_json_line(row) for row in history))
