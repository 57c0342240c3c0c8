"""The epoch loop: written once, run unchanged on CPU, one GPU, many GPUs and many nodes.

`fit` lets Accelerate prepare the model, optimizer, dataloaders and scheduler (loaders from
launcher.data.make_loader are sharded by their own sampler and left alone), then trains and validates
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
import os
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from collections.abc import Mapping  # isinstance against typing.Mapping is several times slower, per batch
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    InitProcessGroupKwargs,
    gather_object,
    send_to_device,
    set_seed,
)
from torch.optim.lr_scheduler import ReduceLROnPlateau
from tqdm.auto import tqdm

from launcher.checkpoint import (
    CheckpointError,
    CheckpointManager,
    TrainerState,
    append_line_durable,
    apply_checkpoint,
    checkpoint_name,
    first_error,
    plain_state_dict,
    read_checkpoint,
    read_trainer_state,
    restore_rng,
    save_weights,
    write_json_atomic,
    write_text_atomic,
)
from launcher.elastic import join_restarted_group
from launcher.errors import EXIT_DIVERGED, EXIT_PREEMPTED, LeaseLost, RunStopped, UsageError
from launcher.fsdp import check_distributed, launcher_shards, shard_model
from launcher.lease import claim_for_ranks
from launcher.metrics import VAL_METRIC_NAMES, ClassificationMetrics, ConfusionStats
from launcher.preemption import PreemptionWatch
from launcher.schedulers import replan
from launcher.data.sampling import ElasticBatchSampler, find_elastic_sampler, iterate, share
from launcher.sharded import (
    check_resume_format,
    full_model_state,
    is_sharded_checkpoint,
    is_sharded_model,
    load_sharded,
    save_sharded,
)
from launcher.tracking import NullTracker, Tracker
from launcher.timeouts import Timeouts
from launcher.watchdog import NO_WATCHDOG, NoWatchdog, nccl_environment, start_watchdog
from launcher.unused_parameters import configure_ddp
from launcher.write_failures import main_writes, write_failed

Batch = Any
UnpackBatch = Callable[[Batch], tuple[Any, torch.Tensor]]


class Preempted(SystemExit):
    """Raised by `fit` after a preemption checkpoint is saved; exits the process with EXIT_PREEMPTED."""

    def __init__(self, checkpoint: Path | None):
        super().__init__(EXIT_PREEMPTED)
        self.checkpoint = checkpoint


class Diverged(SystemExit):
    """Raised by `fit` when a training or validation loss is not finite; exits with EXIT_DIVERGED.

    Checked where the loop reads losses anyway (log interval, mid-epoch save, epoch end), never per step;
    nothing is saved from that point on, so `checkpoints/best` never points at diverged weights.
    """

    def __init__(self, message: str, step: int):
        super().__init__(EXIT_DIVERGED)
        self.message, self.step = message, step

    def __str__(self) -> str:
        return self.message


def make_accelerator(*, grad_accum: int = 1, seed: int | None = None, collective_timeout: float | None = None,
                     init_timeout: float | None = None, **kwargs: Any) -> Accelerator:
    """The Accelerator `fit` expects; mixed precision and topology come from `accelerate launch`.

    - On a machine without a GPU, `cpu=True` makes each process of a multi-process launch join a gloo
      group (otherwise every process silently trains alone as world size 1).
    - `use_seedable_sampler`: the shuffle order of epoch e is a function of (seed, e), which is what makes
      mid-epoch resume exact.
    - `step_scheduler_with_optimizer=False`: `fit` steps schedules once per optimizer step.
    - `non_blocking`: batches are copied to the GPU asynchronously. A blocking copy synchronizes the host
      with the GPU's stream on every batch, so the CPU could never run ahead of the GPU (pair it with
      `pin_memory=True` in the DataLoader, as launcher.data.make_loader does when CUDA is available).
    - `init_timeout` bounds process-group start-up (rendezvous, the first barriers); `collective_timeout`
      bounds each training step once `fit` runs (launcher.watchdog; `fit` reads both from the returned
      accelerator's `launcher_timeouts`). On GPUs the NCCL watchdog / flight-recorder variables of
      `launcher.watchdog.nccl_environment` are set unless already set.
    """
    timeouts = _timeouts(Timeouts(), collective_timeout, init_timeout)
    kwargs.setdefault("cpu", use_cpu())
    if not any(isinstance(h, InitProcessGroupKwargs) for h in kwargs.get("kwargs_handlers", ())):
        kwargs["kwargs_handlers"] = [*kwargs.get("kwargs_handlers", ()),
                                     InitProcessGroupKwargs(timeout=timedelta(seconds=timeouts.init))]
    _prepare_process_group(kwargs["cpu"], timeouts)
    kwargs.setdefault("dataloader_config", DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed,
                                                                   non_blocking=True))
    accelerator = Accelerator(gradient_accumulation_steps=grad_accum, step_scheduler_with_optimizer=False, **kwargs)
    accelerator.launcher_timeouts = timeouts
    check_distributed(accelerator)  # never a silent downgrade (e.g. an FSDP config running as DDP)
    return accelerator


def _timeouts(base: Timeouts, collective: float | None, init: float | None) -> Timeouts:
    return Timeouts(base.collective if collective is None else collective, base.init if init is None else init)


def start_process_group(*, init_timeout: float | None = None) -> PartialState:
    """Join the process group the way make_accelerator would, for work that must happen before the
    Accelerator is built (rank 0 choosing the checkpoint whose config decides grad_accum, say)."""
    timeouts = _timeouts(Timeouts(), None, init_timeout)
    cpu = use_cpu()
    _prepare_process_group(cpu, timeouts)
    return PartialState(cpu=cpu, timeout=timedelta(seconds=timeouts.init))


def _prepare_process_group(cpu: bool, timeouts: Timeouts) -> None:
    """What must happen before the default group exists: NCCL's watchdog settings, torchrun restarts."""
    if torch.cuda.is_available():
        for key, value in nccl_environment().items():
            os.environ.setdefault(key, value)  # read when the NCCL group is created
    join_restarted_group("gloo" if cpu or not torch.cuda.is_available() else "nccl",
                         timedelta(seconds=timeouts.init))  # torchrun restarts: see launcher.elastic


def use_cpu() -> bool:
    """Whether this machine trains on CPUs (gloo); `PartialState(cpu=use_cpu())` starts the process group
    the same way make_accelerator would, for work that must happen before the Accelerator is built."""
    return not (torch.cuda.is_available() or _has_other_accelerator())


def _has_other_accelerator() -> bool:
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return bool((mps and mps.is_available()) or (xpu and xpu.is_available()))


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
    export_final: Callable[[torch.nn.Module, dict, Path], None] | None  # writes more into final/ (rank 0)
    # What a checkpoint saves and a resume restores.
    state: TrainerState
    # The training loader's ElasticBatchSampler (launcher.sampling), None for a loader Accelerate prepared:
    # then the position is samples consumed globally and resume is exact at any world size.
    train_sampler: ElasticBatchSampler | None = None
    # Per-launch bookkeeping.
    manager: CheckpointManager | None = None  # None when output_dir is None
    rng_to_restore: dict | None = None  # a mid-epoch resume restores the RNG after the loader's first draw
    resumed_stats: dict | None = None  # partial-epoch training statistics of this rank, from the checkpoint
    last_checkpoint: Path | None = None  # the folder the latest save wrote
    train_metrics: ClassificationMetrics | None = None  # of the epoch just trained, all-reduced
    log_mark: tuple[float, int, float, float] = (0.0, 0, 0.0, 0.0)  # (time, samples, loss sum, seen) at last log
    resumed_from: Path | None = None  # the checkpoint this launch continues
    write_failure: RunStopped | None = None  # rank 0's failed metrics write, reported by the next save
    watchdog: NoWatchdog = NO_WATCHDOG  # ends the job when a rank stops making progress (launcher.watchdog)
    # A training loader that keeps its own position (`resumes_itself = True`, state_dict/load_state_dict, e.g.
    # launcher.streaming's): every rank's state is saved in the checkpoint's extra["loader_states"] and
    # restored on resume at the same world size.
    stateful_loader: Any = None


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
    lease: Any = None,
    collective_timeout: float | None = None,
    init_timeout: float | None = None,
    find_unused_parameters: str | bool = "auto",
    export_final: Callable[[torch.nn.Module, dict, Path], None] | None = None,
) -> list[dict]:
    """Train `model` for `epochs`, validating after each; returns one metrics row per epoch.

    model, optimizer, loaders: plain PyTorch objects; `fit` prepares them with Accelerate, except loaders
        built on launcher.sampling.ElasticBatchSampler (make_loader), which continue exactly at any world
        size (docs/data.md).
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
    lease: the claim on output_dir (launcher.lease.claim_for_ranks, on every rank) when the caller holds one
        already, as the recipe does before it writes anything; otherwise fit claims output_dir itself for
        the call (a folder in use raises FolderInUse, a UsageError) and releases it at the end.
    Raises `Preempted` (a SystemExit with code 75) after saving a checkpoint on SIGTERM/SIGUSR1,
    `Diverged` (code 3) when a training or validation loss is not finite (docs/relaunch.md),
    `WriteFailed` (exit code 74) on every rank when a checkpoint, metrics line or final/ cannot be written,
    `LeaseLost` (73) when another run took output_dir over; a stalled rank ends the job with exit 76
    (launcher.watchdog).
    A resumed run follows this call's plan: a per-step schedule is re-planned to this call's epochs and
    topology, and a run whose epochs or patience are used up trains nothing (final/ is written only if
    it is missing or stale).
    collective_timeout / init_timeout: seconds a training step / start-up, validation or a checkpoint write
        may stall before the job ends naming the stalled rank (launcher.watchdog); default: the
        accelerator's (make_accelerator's arguments), else launcher.watchdog's defaults.
    find_unused_parameters: 'auto' (one probe step finds parameters the loss does not reach; DDP then
        runs with find_unused_parameters=True), 'on', 'off' or 'static' (see launcher.unused_parameters).
    export_final: called on the main process with the unwrapped model, its full state dict and the final/
        folder once final/model.safetensors is written (the recipe writes final/hf/ with it).
    """
    accelerator = accelerator or make_accelerator(grad_accum=grad_accum, seed=seed,
                                                  collective_timeout=collective_timeout, init_timeout=init_timeout)
    if scheduler is not None and accelerator.step_scheduler_with_optimizer:
        raise ValueError("fit steps the scheduler itself: build the Accelerator with "
                         "step_scheduler_with_optimizer=False (launcher.make_accelerator does)")
    if best_metric not in VAL_METRIC_NAMES:
        raise ValueError(f"best_metric {best_metric!r} is not a metric; choose one of {', '.join(VAL_METRIC_NAMES)}")
    tracker = tracker if tracker is not None else NullTracker()
    configure_ddp(accelerator, model, train_loader, unpack_batch, per_sample_loss_fn(loss_fn), find_unused_parameters)
    if launcher_shards(accelerator):  # an FSDP config on CPU: the launcher applies FSDP2 (launcher.fsdp)
        model = shard_model(accelerator, model, optimizer)
    model, optimizer, train_loader, val_loader = _prepare(accelerator, model, optimizer, train_loader, val_loader)
    train_sampler = find_elastic_sampler(train_loader)
    batches_per_epoch = train_sampler.batches_per_epoch if train_sampler is not None else len(train_loader)
    steps_per_epoch = math.ceil(batches_per_epoch / accelerator.gradient_accumulation_steps)
    sched = scheduler(optimizer.optimizer, steps_per_epoch * epochs) if scheduler else None
    plateau = sched if isinstance(sched, ReduceLROnPlateau) else None
    step_sched = accelerator.prepare_scheduler(sched) if sched is not None and plateau is None else None

    run = FitRun(
        accelerator=accelerator, model=model, optimizer=optimizer, plateau=plateau, step_sched=step_sched,
        per_sample=per_sample_loss_fn(loss_fn), num_classes=num_classes, unpack=unpack_batch,
        max_grad_norm=max_grad_norm, log_every=log_every, tracker=tracker, progress=progress,
        save_every_steps=save_every_steps, output_dir=Path(output_dir) if output_dir else None,
        export_final=export_final,
        state=TrainerState(world_size=accelerator.num_processes, config=dict(config or {}),
                           extra=dict(extra_state or {})),
        train_sampler=train_sampler,
    )
    own_lease = run.output_dir is not None and lease is None
    if own_lease:
        lease = claim_for_ranks(run.output_dir, is_main=accelerator.is_main_process)
    if getattr(train_loader, "resumes_itself", False):  # not hasattr(state_dict): accelerate's loaders have one
        run.stateful_loader = train_loader
    watch = PreemptionWatch()
    timeouts = _timeouts(getattr(accelerator, "launcher_timeouts", None) or Timeouts(), collective_timeout,
                         init_timeout)
    run.watchdog = start_watchdog(lambda: (run.state.epoch, run.state.batches_done), timeouts)
    exit_code = 1
    try:
        if run.output_dir is not None:
            if accelerator.is_main_process:
                run.output_dir.mkdir(parents=True, exist_ok=True)
            run.manager = CheckpointManager(run.output_dir, keep_last=keep_last,
                                            is_main=accelerator.is_main_process, lease=lease)
            run.manager.clean_stale()
        if resume_from is not None:
            _resume(run, Path(resume_from))
            _replan_schedule(run, planned_steps(run.state, len(train_loader),
                                                accelerator.gradient_accumulation_steps, epochs))
        elif run.output_dir is not None and accelerator.is_main_process and (run.output_dir / "metrics.jsonl").exists():
            _rewrite_metrics(run.output_dir, [])  # rows of an attempt that never reached a checkpoint
        finished = finished_reason(run.state, epochs, early_stopping_patience, best_metric)
        if finished:
            _finish_finished(run, finished, epochs, early_stopping_patience)
            exit_code = 0
            return run.state.history
        run.state.finished = ""  # a relaunch that trains further: the run is no longer finished
        while run.state.epoch < epochs:
            epoch = run.state.epoch
            if not _train_epoch(run, train_loader, epoch, epochs, watch):
                _save(run, reason="preempted")
                exit_code = EXIT_PREEMPTED
                raise Preempted(run.last_checkpoint)
            with run.watchdog.slow():
                row = _validate_and_record(run, val_loader, epoch, best_metric)
            _check_finite(run, {"training": row["train_loss"], "validation": row["val_loss"]})  # row written
            stop_early = _update_best_and_patience(run, row, best_metric, best_mode, min_delta,
                                                   early_stopping_patience)
            if run.plateau is not None:
                run.plateau.step(row[best_metric])
            run.state.epoch, run.state.batches_done, run.state.samples_done = epoch + 1, 0, 0
            run.state.train_stats, run.state.epoch_seconds, run.state.train_seconds = None, 0.0, 0.0
            if stop_early or run.state.epoch >= epochs:
                run.state.finished = "early-stopped" if stop_early else "completed"  # recorded, see finished_reason
            _save(run, reason="epoch", best=row["epoch"] == run.state.best_epoch)
            if stop_early:
                accelerator.print(f"early stopping: {best_metric} has not improved for "
                                  f"{run.state.bad_epochs} epochs")
                break
            if watch.should_stop() and run.state.epoch < epochs:
                exit_code = EXIT_PREEMPTED
                raise Preempted(run.last_checkpoint)
        with run.watchdog.slow():
            _write_final(run)
        exit_code = 0
        return run.state.history
    except Diverged as err:
        exit_code = EXIT_DIVERGED
        if accelerator.is_main_process:
            print(f"diverged: {err}", file=sys.stderr, flush=True)
        raise
    finally:
        run.watchdog.close()
        watch.close()
        if own_lease:
            lease.release()
        tracker.finish(run.state.history, exit_code)
        if exit_code in (EXIT_PREEMPTED, EXIT_DIVERGED) and dist.is_available() and dist.is_initialized():
            # The process is about to exit: leave together and tear the group down, so that no rank drops
            # a connection a peer still uses and torchrun's exit barrier is clean.
            dist.barrier()
            dist.destroy_process_group()


def _prepare(acc: Accelerator, model: Any, optimizer: Any, train_loader: Any, val_loader: Any) -> tuple:
    """Accelerate prepares the model, the optimizer and any plain loader. A loader built on an
    ElasticBatchSampler (launcher.data.make_loader) is already sharded by its sampler and stays as it is:
    Accelerate's re-sharding would pad its last batch with repeated samples and count its position per rank."""
    loaders = [train_loader, val_loader]
    plain = [i for i, loader in enumerate(loaders) if find_elastic_sampler(loader) is None]
    for loader in loaders:
        sampler = find_elastic_sampler(loader)
        if sampler is not None and sampler.world_size != acc.num_processes:
            raise ValueError(f"a loader's ElasticBatchSampler was built for {sampler.world_size} processes but this "
                             f"run has {acc.num_processes}; build loaders after the Accelerator (make_loader reads "
                             f"the process group)")
    model, optimizer, *prepared = acc.prepare(model, optimizer, *(loaders[i] for i in plain))
    for i, loader in zip(plain, prepared):
        loaders[i] = loader
    return model, optimizer, loaders[0], loaders[1]


def _resume(run: FitRun, path: Path) -> None:
    """Load the checkpoint on every rank, all or nothing: every rank checks everything first, and only
    when all ranks could (one all-gather) does any rank apply it."""
    acc = run.accelerator
    check_resume_format(path, sharded_run=is_sharded_model(run.model))
    scheduler = run.step_sched.scheduler if run.step_sched is not None else run.plateau
    if is_sharded_checkpoint(path):  # DCP reshards: any world size, FSDP or plain model
        state, rng, stats = load_sharded(path, model=acc.unwrap_model(run.model), optimizer=run.optimizer,
                                         scheduler=scheduler, scaler=acc.scaler, rank=acc.process_index)
    else:
        targets = {"model": acc.unwrap_model(run.model, keep_torch_compile=False), "optimizer": run.optimizer,
                   "scheduler": scheduler, "scaler": acc.scaler}
        loaded, error = None, None
        try:
            loaded = read_checkpoint(path, rank=acc.process_index, **targets)
        except CheckpointError as err:
            error = str(err)
        error = first_error(error)
        if error is not None:
            raise UsageError(f"cannot resume from {path}: {error}")
        apply_checkpoint(loaded, **targets)
        state, rng, stats = loaded.state, loaded.rng, loaded.stats
    sampler = run.train_sampler
    if sampler is not None and state.batches_done and not state.samples_done:
        # A checkpoint from before samples_done existed: its per-process position, counted globally. It was
        # written with Accelerate's shuffle order, so the rest of that epoch is not the same samples.
        state.samples_done = min(state.batches_done * sampler.batch_size * state.world_size, sampler.num_samples)
    if state.world_size != acc.num_processes:
        if sampler is not None:
            stats, rng = _elastic_resume(run, path, state, stats, rng)
        else:
            if state.batches_done:
                # Per-process positions of Accelerate's sharding do not map onto another world size.
                warnings.warn(f"checkpoint {path} was written by {state.world_size} processes, this run has "
                              f"{acc.num_processes}: the interrupted epoch restarts from its beginning and the "
                              f"result is not bit-identical to an uninterrupted run (loaders from "
                              f"launcher.data.make_loader continue exactly)", stacklevel=3)
                state.batches_done, state.samples_done, state.train_stats = 0, 0, None
                state.epoch_seconds, state.train_seconds = 0.0, 0.0
                stats = None
            rng = None
    run.state = TrainerState(**{**state.__dict__, "world_size": acc.num_processes,
                                "config": run.state.config or state.config,
                                "extra": {**state.extra, **run.state.extra}})
    run.rng_to_restore, run.resumed_stats, run.resumed_from = rng, stats, path
    loader_states = state.extra.get("loader_states")
    if run.stateful_loader is not None and loader_states and state.world_size == acc.num_processes:
        run.stateful_loader.load_state_dict(loader_states[acc.process_index])
    if rng is not None and (run.state.batches_done == 0 or sampler is not None):
        # The next epoch starts, or (an elastic loader, whose iterator draws nothing from the global RNG)
        # the epoch continues, exactly where the saved run was.
        restore_rng(rng)
        run.rng_to_restore = None
    if run.output_dir is not None and acc.is_main_process:
        _rewrite_metrics(run.output_dir, run.state.history)
    acc.print(f"resumed from {path} (epoch {run.state.epoch + 1}, step {run.state.global_step}, "
              f"{run.state.batches_done} batches, {run.state.samples_done} samples into the epoch)")


def _elastic_resume(run: FitRun, path: Path, state: TrainerState, stats: dict | None,
                    rng: dict | None) -> tuple[dict | None, dict | None]:
    """Resume a checkpoint of another world size with an elastic loader: the epoch continues at
    `samples_done`, so every remaining sample is seen exactly once (not bit-identical: the global batch and
    the ranks' random streams differ). Returns this rank's (partial-epoch statistics, RNG state)."""
    acc, sampler = run.accelerator, run.train_sampler
    if state.samples_done:
        # The saved per-rank statistics are summed into rank 0's, so the epoch's all-reduce counts each once.
        saved = [s for s in read_trainer_state(path).get("train_stats") or [] if s is not None]
        stats = _sum_stats(saved, run.num_classes) if acc.is_main_process and saved else None
    if rng is None:
        # A rank the checkpoint did not have: a stream derived from the checkpoint's rank 0 and this rank.
        set_seed(_derived_seed(path, acc.process_index))
    old, new = sampler.batch_size * state.world_size, sampler.global_batch_size
    keep = f"; --batch-size {old // acc.num_processes} keeps it" if old % acc.num_processes == 0 and old != new else ""
    acc.print(f"checkpoint {path} was written by {state.world_size} processes, this run has {acc.num_processes}: "
              f"the global batch is {new} samples ({sampler.batch_size} per process, was {old}){keep}; the "
              f"epoch continues at sample {state.samples_done} of {sampler.num_samples}, every remaining sample "
              f"seen exactly once")
    state.batches_done = -(-state.samples_done // new)  # per process, for display only
    return stats, rng


def _sum_stats(saved: list[dict], num_classes: int) -> dict:
    """ConfusionStats.state_dict()s of several ranks added together."""
    total = ConfusionStats(num_classes, torch.device("cpu"))
    for state in saved:
        part = ConfusionStats(num_classes, torch.device("cpu"))
        part.load_state_dict(state)
        total.buffer.add_(part.buffer)
    return total.state_dict()


def _derived_seed(path: Path, rank: int) -> int:
    ranks = torch.load(path / "rng.pt", weights_only=True)["ranks"]
    generator = torch.Generator()
    generator.set_state(ranks[0]["torch"])
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator)) + rank


def planned_steps(state: TrainerState, batches_per_epoch: int, grad_accum: int, epochs: int) -> int:
    """Optimizer steps at the end of the run as this launch plans it: the steps taken, the rest of the epoch
    in progress and the epochs still to come, on this launch's topology and batch size.

    A relaunch with the flags and world size it was trained with plans exactly `steps_per_epoch * epochs`.
    """
    if state.epoch >= epochs:
        return state.global_step
    steps_per_epoch = math.ceil(batches_per_epoch / grad_accum)
    rest_of_epoch = math.ceil(max(batches_per_epoch - state.batches_done, 0) / grad_accum)
    return state.global_step + rest_of_epoch + steps_per_epoch * (epochs - state.epoch - 1)


def _replan_schedule(run: FitRun, total_steps: int) -> None:
    """The resumed schedule follows the plan of this launch (more epochs, another world or batch size)."""
    if run.step_sched is None:
        return
    changed = replan(run.step_sched.scheduler, total_steps)
    if changed is not None:
        old_total, before, after = changed
        run.accelerator.print(f"relaunch: the LR schedule is re-planned to end at step {total_steps} (it ended "
                              f"at step {old_total}); at step {run.state.global_step} the LR goes from "
                              f"{before:.3g} to {after:.3g} and follows the schedule from there")


def finished_reason(state: TrainerState, epochs: int, patience: int | None, best_metric: str) -> str:
    """Why a resumed run has nothing left to do under this launch's --epochs and patience ('' otherwise)."""
    if state.batches_done:
        return ""
    if state.epoch >= epochs:
        return f"it has trained {state.epoch} epochs and --epochs is {epochs}"
    if patience is not None and state.bad_epochs >= patience:
        return (f"it stopped early at epoch {state.epoch}: {best_metric} has not improved for "
                f"{state.bad_epochs} epochs and --early-stopping-patience is {patience}")
    return ""


def _finish_finished(run: FitRun, reason: str, epochs: int, patience: int | None) -> None:
    """A relaunch of a finished run changes nothing; it only completes final/ when a kill interrupted it."""
    acc, state = run.accelerator, run.state
    how = (f"--epochs more than {state.epoch}" if state.epoch >= epochs else
           f"--early-stopping-patience more than {state.bad_epochs} (and --epochs more than {state.epoch} "
           f"if needed)")
    if _final_is_current(run):
        acc.print(f"nothing to do: the run in {run.output_dir} is finished ({reason}); final/ is unchanged. "
                  f"To train further, relaunch with {how}")
        return
    acc.print(f"the run in {run.output_dir} is finished ({reason}); writing final/ from {run.resumed_from}")
    _write_final(run)


def _final_is_current(run: FitRun) -> bool:
    """final/ holds this run's weights at its last step (a kill after the last checkpoint leaves it stale)."""
    if run.output_dir is None:
        return True
    try:
        saved = json.loads((run.output_dir / "final" / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    weights = run.output_dir / "final" / "model.safetensors"
    return saved.get("global_step") == run.state.global_step and weights.is_file()


def _check_finite(run: FitRun, losses: Mapping[str, float | str]) -> None:
    """Stop the run (Diverged) when a loss that every rank agrees on is not finite."""
    for what, value in losses.items():
        if isinstance(value, str) or not math.isfinite(value):
            raise Diverged(f"the {what} loss is {value} at step {run.state.global_step} (epoch {run.state.epoch + 1}); "
                           f"nothing was saved from this point; lower --lr or clip gradients (--max-grad-norm), and "
                           f"start a fresh run or --resume an earlier checkpoint", run.state.global_step)


def _weights_finite(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether every rank's parameters are finite: this rank's own (its shards under FSDP, nothing is
    gathered), one host read and one tiny all-reduce; called only at saves."""
    local = [getattr(p, "_local_tensor", p) for p in model.parameters() if p.is_floating_point()]
    bad = torch.zeros(1, device=device)  # on the device: NCCL reduces only device tensors
    if local:
        bad += torch.stack([~torch.isfinite(t).all() for t in local]).any().to(device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad)
    return not bad.item()


def _check_finite_local(run: FitRun, stats: ConfusionStats) -> None:
    """The training loss so far, agreed across ranks (one tiny all-reduce; only where the loop syncs anyway)."""
    bad = (~torch.isfinite(stats.buffer[-1:])).to(stats.buffer.dtype)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad)
    if bad.item():
        local = stats.buffer[-1].item()
        _check_finite(run, {"training": local if not math.isfinite(local) else "not finite on another process"})


def _train_epoch(run: FitRun, train_loader: Any, epoch: int, epochs: int, watch: PreemptionWatch) -> bool:
    """Train one epoch (or its rest after a resume). Returns False when the ranks agreed to stop."""
    acc, model, optimizer, state = run.accelerator, run.model, run.optimizer, run.state
    stats = ConfusionStats(run.num_classes, acc.device)
    if run.resumed_stats is not None:
        stats.load_state_dict(run.resumed_stats)
        run.resumed_stats = None
    accumulate, backward, step = _step_functions(acc, optimizer)
    feed = None
    if run.train_sampler is not None:
        # The sampler continues at the global position: no batches to skip, nothing for Accelerate to shard.
        run.train_sampler.set_epoch(epoch, start=state.samples_done)
        feed = _ElasticFeed(acc, run.train_sampler, backward)
        loader, total_batches, done_before = iterate(train_loader), feed.epoch_batches, feed.epoch_batches - len(feed)
        accumulate, backward = feed.accumulate, feed.backward
    else:
        train_loader.set_epoch(epoch)  # epoch e shuffles with (seed, e): the same order after a resume
        # A stateful loader resumes itself (its state came from the checkpoint); others skip consumed batches.
        skip = state.batches_done and run.stateful_loader is None
        loader = acc.skip_first_batches(train_loader, state.batches_done) if skip else train_loader
        total_batches, done_before = len(train_loader), state.batches_done
        remainder = last_batch_remainder(train_loader)
    bar = tqdm(total=total_batches, initial=done_before, desc=f"epoch {epoch + 1}/{epochs}",
               disable=not (run.progress and acc.is_local_main_process), leave=False, dynamic_ncols=True)
    clock = _EpochClock(state)
    run.log_mark = (time.perf_counter(), 0, 0.0, 0.0)
    model.train()
    run.watchdog.training()
    for batch in loader:
        if run.rng_to_restore is not None:
            # Resumed mid-epoch: creating the iterator drew from the global RNG; now continue the saved
            # stream exactly where the interrupted run was.
            restore_rng(run.rng_to_restore)
            run.rng_to_restore = None
        if feed is not None:
            batch = feed.next(batch)
        inputs, targets = run.unpack(batch)
        with accumulate(model):
            outputs = forward(model, inputs)
            losses = run.per_sample(outputs, targets)
            backward(losses)
            if acc.sync_gradients and run.max_grad_norm:
                acc.clip_grad_norm_(model.parameters(), run.max_grad_norm)
            step()
        if feed is None:
            valid = valid_in_batch(state.batches_done + 1 == total_batches, remainder, _batch_len(targets),
                                   acc.process_index)
        else:
            valid = None  # an elastic loader never repeats a sample
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
        if feed is not None:
            state.samples_done, last = feed.position, feed.is_last
        else:
            state.samples_done = _plain_samples_done(train_loader, state.batches_done)
            last = state.batches_done == total_batches
        if state.global_step % run.log_every == 0:
            _check_finite_local(run, stats)
            progress = state.samples_done / feed.sampler.num_samples if feed else state.batches_done / total_batches
            _log_train(run, stats, clock, epoch + progress, bar)
        if last:
            continue  # the epoch-end checkpoint covers it; no break, so Accelerate's loader closes itself
        if watch.should_stop():
            clock.snapshot(stats)
            bar.close()
            return False
        if should_save_step(state.global_step, run.save_every_steps):
            _check_finite_local(run, stats)  # a checkpoint of diverged weights would be resumed
            clock.snapshot(stats)
            _save(run, reason="step")
    bar.close()
    run.train_metrics = stats.reduce()
    clock.snapshot(None)
    return True


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
        "train_samples": run.train_metrics.samples,  # each training sample counted once, at any world size
        **val.as_row("val"),
        "lr": run.optimizer.param_groups[0]["lr"],
        "epoch_seconds": state.epoch_seconds + time.perf_counter() - started,  # train + validation
        # Exact global count of trained samples over this process's training time (ranks run in step).
        "samples_per_second": run.train_metrics.samples / state.train_seconds if state.train_seconds else 0.0,
        "world_size": acc.num_processes,
    }
    state.history.append(row)
    if acc.is_main_process:
        if run.output_dir is not None and run.write_failure is None:
            try:
                _check_lease(run)
                append_line_durable(run.output_dir / "metrics.jsonl", _json_line(row))
            except LeaseLost as err:
                run.write_failure = err
            except OSError as err:
                run.write_failure = write_failed(err, run.output_dir, "metrics.jsonl")
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
    with run.watchdog.slow():
        _write_checkpoint(run, reason, best)


def _write_checkpoint(run: FitRun, reason: str, best: bool) -> None:
    acc, state = run.accelerator, run.state
    # The loss so far can be finite while the last update already made the weights NaN: never save those.
    if not _weights_finite(run.model, acc.device):
        _check_finite(run, {"training": "finite, but the weights are not"})
    state.reason = reason
    if best:
        state.best_checkpoint = checkpoint_name(state.global_step)
    if run.stateful_loader is not None:  # a collective: every rank calls _save
        state.extra["loader_states"] = gather_object([run.stateful_loader.state_dict()])
    scheduler = run.step_sched.scheduler if run.step_sched is not None else run.plateau
    if is_sharded_model(run.model):  # every rank writes its own shards (launcher.sharded)
        path = save_sharded(run.manager, state, model=acc.unwrap_model(run.model),
                            optimizer=run.optimizer, scheduler=scheduler, scaler=acc.scaler,
                            best=best, failure=run.write_failure)
    else:
        path = run.manager.save(state, model_state=acc.get_state_dict(run.model), optimizer=run.optimizer,
                                scheduler=scheduler, scaler=acc.scaler, best=best, failure=run.write_failure)
    run.last_checkpoint = path
    run.manager.rotate(protect=state.best_checkpoint)


def _check_lease(run: FitRun) -> None:
    """Raise LeaseLost when another run took the output folder over (rank 0; the others hold no lease)."""
    if run.manager is not None and run.manager.lease is not None:
        run.manager.lease.check()


def _write_final(run: FitRun) -> None:
    """final/model.safetensors: the weights at the end of training, written atomically by rank 0."""
    acc = run.accelerator
    acc.wait_for_everyone()
    if run.output_dir is None:
        return
    # Under FSDP the whole model exists only here, once, gathered onto rank 0's CPU.
    weights = plain_state_dict(full_model_state(acc.unwrap_model(run.model)) if is_sharded_model(run.model)
                               else acc.get_state_dict(run.model))
    final = run.output_dir / "final"

    def write() -> None:
        _check_lease(run)
        final.mkdir(parents=True, exist_ok=True)
        tmp = final / ".model.safetensors.tmp"
        try:
            save_weights(weights, tmp)
            tmp.replace(final / "model.safetensors")
        finally:
            tmp.unlink(missing_ok=True)
        write_json_atomic(final / "trainer_state.json", {"history": run.state.history, "config": run.state.config,
                                                         "global_step": run.state.global_step,
                                                         "finished": run.state.finished})
        if run.export_final is not None:
            run.export_final(acc.unwrap_model(run.model), weights, final)

    main_writes(acc.is_main_process, final, "final weights", write)


def _json_line(row: Mapping[str, Any]) -> str:
    """Strict JSON (RFC 8259 has no NaN/Infinity): a non-finite value is written as null."""
    return json.dumps(finite_or_none(row), allow_nan=False) + "\n"


def finite_or_none(value: Any) -> Any:
    """`value` with every non-finite float (NaN, inf) replaced by None, in nested lists and dicts."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def _rewrite_metrics(output_dir: Path, history: list[dict]) -> None:
    """After a resume metrics.jsonl holds exactly the checkpoint's epochs (atomically replaced)."""
    write_text_atomic(output_dir / "metrics.jsonl", "".join(_json_line(row) for row in history))
