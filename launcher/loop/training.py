"""The epoch loop itself: `fit`, one epoch of training, logging, validation, early stopping."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch.optim.lr_scheduler import ReduceLROnPlateau
from tqdm.auto import tqdm

from launcher.checkpoint import CheckpointManager, TrainerState, append_line_durable, restore_rng
from launcher.data.sampling import find_elastic_sampler, iterate
from launcher.errors import EXIT_DIVERGED, EXIT_PREEMPTED, LeaseLost
from launcher.faults.gloo_exit import settle_gloo_workers_at_exit
from launcher.faults.lease import claim_for_ranks
from launcher.faults.preemption import PreemptionWatch
from launcher.faults.timeouts import Timeouts
from launcher.faults.watchdog import start_watchdog
from launcher.faults.write_failures import write_failed
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
from launcher.loop.callbacks import Callback, Callbacks
from launcher.loop.evaluation import _evaluate
from launcher.loop.options import Checkpointing, EarlyStopping, Monitor
from launcher.loop.outputs import (
    Diverged,
    _check_finite,
    _check_lease,
    _json_line,
    _rewrite_metrics,
    _save,
    _write_final,
)
from launcher.loop.resume import _finish_finished, _replan_schedule, _resume, finished_reason, planned_steps
from launcher.loop.state import FitRun
from launcher.loop.steps import _CountWeights, _ElasticFeed, _plain_samples_done, _step_functions
from launcher.loop.user_model import user_step
from launcher.parallel.fsdp import block_wrap_policy, is_fsdp, launcher_shards, shard_model
from launcher.parallel.unused_parameters import configure_ddp
from launcher.tasks.base import Task, TaskStats
from launcher.tasks.metrics import MetricSet
from launcher.tracking.throughput import Throughput
from launcher.tracking.tracker import NullTracker, Tracker


class Preempted(SystemExit):
    """Raised by `fit` after a preemption checkpoint is saved; exits the process with EXIT_PREEMPTED."""

    def __init__(self, checkpoint: Path | None):
        super().__init__(EXIT_PREEMPTED)
        self.checkpoint = checkpoint


def _better(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best + min_delta if mode == "max" else value < best - min_delta


def fit(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: Iterable,
    val_loader: Iterable,
    loss_fn: Callable | str | None = None,
    *,
    epochs: int,
    task: Task | None = None,
    num_classes: int | None = None,
    metrics: Mapping[str, Any] | None = None,
    step: Callable | None = None,
    accelerator: Accelerator | None = None,
    scheduler: Callable | None = None,
    grad_accum: int = 1,
    max_grad_norm: float | None = None,
    seed: int | None = None,
    monitor: Monitor = Monitor(),
    early_stopping: EarlyStopping | None = None,
    checkpointing: Checkpointing | None = None,
    timeouts: Timeouts | None = None,
    log_every: int = 50,
    tracker: Tracker | None = None,
    progress: bool = True,
    unpack_batch: UnpackBatch = default_unpack,
    find_unused_parameters: str | bool = "auto",
    throughput: Throughput | None = None,
    callbacks: Sequence[Callback] | None = None,
) -> list[dict]:
    """Train `model` for `epochs`, validating after each; returns one metrics row per epoch.

    model, optimizer, loaders: plain PyTorch objects; `fit` prepares them with Accelerate, except loaders
        built on launcher.data.sampling.ElasticBatchSampler (make_loader), which continue exactly at any world
        size (docs/data.md).
    task: what the model learns (launcher.tasks: SingleLabelClassification, MultiLabelClassification,
        Regression, CausalLM, or your own): its loss, its exact metrics and the default `monitor`.
    num_classes: shorthand for task=SingleLabelClassification(num_classes, loss_fn).
    loss_fn: a per-sample loss `(outputs, targets)` of any target shape (torch losses are copied with
        reduction='none'; each sample's loss is the mean over its elements), or 'model': the model's own
        loss (`model(**inputs, labels=targets).loss`, transformers' convention); without task= or
        num_classes= the run reports val_loss and the user metrics.
    step: a custom step `(model, batch) -> launcher.tasks.StepOutput(loss_sum, count, outputs, targets)`
        for anything else (several outputs or loss terms); every counted item weighs the same. Its `model` is
        the prepared model's call with the plain model's attributes (launcher.loop.user_model.UserModel:
        `model(x)` goes through DDP's wrapper, so gradients are all-reduced; `model.my_head` works on any
        number of processes); on one process the model itself.
    metrics: user metrics by name, torchmetrics' interface (`val_<name>` in every row; launcher.tasks.metrics).
    accelerator: defaults to `make_accelerator(grad_accum=grad_accum, seed=seed)`.
    scheduler: a factory `(optimizer, total_optimizer_steps) -> scheduler` (see launcher.schedulers);
        per-step schedules step after every optimizer step, ReduceLROnPlateau after every epoch with the
        monitored metric.
    max_grad_norm: clip the global gradient norm on every optimizer step (None: no clipping).
    monitor: the validation metric that `checkpoints/best`, early stopping and ReduceLROnPlateau follow.
    early_stopping: stop when the monitored metric stopped improving (None: train every epoch).
    checkpointing: what is kept in its output_dir, and the checkpoint to resume from (None: nothing is
        written; see launcher.loop.options.Checkpointing).
    timeouts: how long a training step / start-up, validation or a checkpoint write may stall before the
        job ends naming the stalled rank (launcher.faults.watchdog); default: the accelerator's (make_accelerator's
        arguments), else launcher.faults.timeouts' defaults.
    log_every: training-loss log interval in optimizer steps (passed to tracker.log_train).
    find_unused_parameters: 'auto' (one probe step finds parameters the loss does not reach; DDP then
        runs with find_unused_parameters=True), 'on', 'off' or 'static' (see launcher.parallel.unused_parameters).
    throughput: the model's FLOPs per token and the device's peak (launcher.tracking.throughput.Throughput):
        a token-level task's rows then carry `mfu` beside `tokens_per_second` (which they carry anyway).
    callbacks: launcher.Callback objects (e.g. launcher.EMA(0.999)): hooks at train start, after each optimizer
        step, after each validation, at saves and at the end; their state is in every checkpoint and restored
        exactly on resume (launcher.loop.callbacks, docs/callbacks.md). None or []: the loop pays nothing.
    Raises `Preempted` (a SystemExit with code 75) after saving a checkpoint on SIGTERM/SIGUSR1,
    `Diverged` (code 3) when a training or validation loss is not finite (docs/relaunch.md),
    `WriteFailed` (exit code 74) on every rank when a checkpoint, metrics line or final/ cannot be written,
    `LeaseLost` (73) when another run took output_dir over; a stalled rank ends the job with exit 76
    (launcher.faults.watchdog).
    A resumed run follows this call's plan: a per-step schedule is re-planned to this call's epochs and
    topology, and a run whose epochs or patience are used up trains nothing (final/ is written only if
    it is missing or stale).
    """
    settle_gloo_workers_at_exit()  # a user-built Accelerator too (launcher.faults.gloo_exit)
    accelerator = accelerator or make_accelerator(
        grad_accum=grad_accum, seed=seed, collective_timeout=timeouts.collective if timeouts else None,
        init_timeout=timeouts.init if timeouts else None)
    if scheduler is not None and accelerator.step_scheduler_with_optimizer:
        raise ValueError("fit steps the scheduler itself: build the Accelerator with "
                         "step_scheduler_with_optimizer=False (launcher.make_accelerator does)")
    ckpt = checkpointing or Checkpointing(output_dir=None)
    patience = early_stopping.patience if early_stopping else None
    tracker = tracker if tracker is not None else NullTracker()
    # The unused-parameter probe takes one batch; a loader that counts what it hands out (a stream) would
    # count it as trained, so such a run probes on a validation batch (same inputs, no augmentation).
    probe_loader = val_loader if getattr(train_loader, "resumes_itself", False) else train_loader
    task = resolve_task(task, loss_fn, num_classes, step)
    compute = batch_losses(task, unpack_batch, loss_fn, user_step(step))
    metric_set = MetricSet(metrics, accelerator.device)
    monitor = monitor.resolve(task, metric_set.names())  # a name the run never produces fails here

    def batch_loss(module: torch.nn.Module, batch: Any) -> torch.Tensor:  # the probe's loss: the loop's own
        out = compute(module, batch)
        return out.losses.sum() / (out.counts.sum().clamp(min=1) if out.counts is not None else out.losses.numel())

    configure_ddp(accelerator, model, probe_loader, batch_loss, find_unused_parameters)
    if is_fsdp(accelerator):
        block_wrap_policy()  # one unit per transformer block (accelerate's size-based picks break HF causal LMs)
    if launcher_shards(accelerator):  # an FSDP config on CPU: the launcher applies FSDP2 (launcher.parallel.fsdp)
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
        task=task, compute=compute, metrics=metric_set, unpack=unpack_batch,
        max_grad_norm=max_grad_norm, log_every=log_every, tracker=tracker, progress=progress,
        save_every_steps=ckpt.save_every_steps, output_dir=Path(ckpt.output_dir) if ckpt.output_dir else None,
        export_final=ckpt.export_final, throughput=throughput,
        state=TrainerState(world_size=accelerator.num_processes, config=dict(ckpt.config or {}),
                           extra=dict(ckpt.extra_state or {})),
        train_sampler=train_sampler,
    )

    def evaluate_now() -> Any:  # a callback's run.evaluate(): this epoch's validation on the current weights
        with run.watchdog.evaluating():
            return _evaluate(run.model, val_loader, run.task, run.compute, run.metrics, accelerator, run.watchdog)

    run.callbacks = Callbacks(callbacks, run, evaluate_now) if callbacks else None
    lease = ckpt.lease
    own_lease = run.output_dir is not None and lease is None
    if own_lease:
        lease = claim_for_ranks(run.output_dir, is_main=accelerator.is_main_process)
    if getattr(train_loader, "resumes_itself", False):  # not hasattr(state_dict): accelerate's loaders have one
        run.stateful_loader = train_loader
    watch = PreemptionWatch()
    timeouts = timeouts or getattr(accelerator, "launcher_timeouts", None) or Timeouts()
    run.watchdog = start_watchdog(lambda: (run.state.epoch, run.state.batches_done), timeouts)
    run.watchdog.watch_signals(watch)
    exit_code = 1
    try:
        if run.output_dir is not None:
            if accelerator.is_main_process:
                run.output_dir.mkdir(parents=True, exist_ok=True)
            run.manager = CheckpointManager(run.output_dir, keep_last=ckpt.keep_last,
                                            is_main=accelerator.is_main_process, lease=lease)
            run.manager.clean_stale()
        if ckpt.resume_from is not None:
            _resume(run, Path(ckpt.resume_from))
            _replan_schedule(run, planned_steps(run.state, len(train_loader),
                                                accelerator.gradient_accumulation_steps, epochs))
        elif run.output_dir is not None and accelerator.is_main_process and (run.output_dir / "metrics.jsonl").exists():
            _rewrite_metrics(run.output_dir, [])  # rows of an attempt that never reached a checkpoint
        if run.callbacks is not None:
            run.callbacks.train_start()  # after the resume: the callbacks' own state is restored here
        finished = finished_reason(run.state, epochs, patience, monitor.metric)
        if finished:
            if run.callbacks is not None:
                run.callbacks.train_end()
            _finish_finished(run, finished, epochs, patience)
            exit_code = 0
            return run.state.history
        run.state.finished = ""  # a relaunch that trains further: the run is no longer finished
        while run.state.epoch < epochs:
            epoch = run.state.epoch
            if not _train_epoch(run, train_loader, epoch, epochs, watch):
                _save(run, reason="preempted")
                exit_code = EXIT_PREEMPTED
                raise Preempted(run.last_checkpoint)
            with run.watchdog.slow("validation"):  # its batches a step's bound each; its row's write, W&B: slow
                row = _validate_and_record(run, val_loader, epoch)
            _check_finite(run, {"training": row["train_loss"], "validation": row["val_loss"]})  # row written
            stop_early = _update_best_and_patience(run, row, monitor, early_stopping)
            if run.plateau is not None:
                run.plateau.step(row[monitor.metric])
            run.state.epoch, run.state.batches_done, run.state.samples_done = epoch + 1, 0, 0
            run.state.train_stats, run.state.epoch_seconds, run.state.train_seconds = None, 0.0, 0.0
            if stop_early or run.state.epoch >= epochs:
                run.state.finished = "early-stopped" if stop_early else "completed"  # recorded, see finished_reason
            _save(run, reason="epoch", best=row["epoch"] == run.state.best_epoch)
            if stop_early:
                accelerator.print(f"early stopping: {monitor.metric} has not improved for "
                                  f"{run.state.bad_epochs} epochs")
                break
            if watch.should_stop() and run.state.epoch < epochs:
                exit_code = EXIT_PREEMPTED
                raise Preempted(run.last_checkpoint)
        if run.callbacks is not None:
            run.callbacks.train_end()  # before final/: EMA copies its weights into the model here
        with run.watchdog.slow("final save"):
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


def _train_epoch(run: FitRun, train_loader: Any, epoch: int, epochs: int, watch: PreemptionWatch) -> bool:
    """Train one epoch (or its rest after a resume). Returns False when the ranks agreed to stop."""
    acc, model, optimizer, state = run.accelerator, run.model, run.optimizer, run.state
    stats = run.task.stats(acc.device)
    if run.resumed_stats is not None:
        stats.load_state_dict(run.resumed_stats)
        run.resumed_stats = None
    accumulate, backward, step = _step_functions(acc, optimizer)
    # Losses known as a sum and a count (tokens, a custom step) are weighed at the step boundary instead.
    counted = None if not _counts_items(run) else _CountWeights(acc, model, getattr(backward, "plain", False))
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
    # A bar only on a terminal: piped into a file its redraws leave fragments; the epoch line says it all.
    bar = tqdm(total=total_batches, initial=done_before, desc=f"epoch {epoch + 1}/{epochs}",
               disable=not (run.progress and acc.is_local_main_process and sys.stderr.isatty()), leave=False,
               dynamic_ncols=True)
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
        with accumulate(model):
            out = run.compute(model, batch)
            if counted is None:
                backward(out.losses)
            else:
                counted.backward(out.losses, out.counts)
                if acc.sync_gradients:
                    counted.rescale()
            if acc.sync_gradients and run.max_grad_norm:  # the norm before clipping, kept on the device
                run.grad_norm = acc.clip_grad_norm_(model.parameters(), run.max_grad_norm)
            step()
        n = samples_in(out)
        if feed is None and n is not None:
            valid = valid_in_batch(state.batches_done + 1 == total_batches, remainder, n, acc.process_index)
        else:
            valid = None  # an elastic loader never repeats a sample
        stats.add_batch(out, valid)
        clock.samples += (n or 0) if valid is None else valid
        state.batches_done += 1
        bar.update(1)
        if not acc.sync_gradients:
            continue
        # An optimizer step boundary: the only place where state is consistent enough to save.
        if run.step_sched is not None and not acc.optimizer_step_was_skipped:
            run.step_sched.step()
        state.global_step += 1
        if run.callbacks is not None:
            run.callbacks.step_end()
        if feed is not None:
            state.samples_done, last = feed.position, feed.is_last
        else:
            state.samples_done = _plain_samples_done(train_loader, state.batches_done)
            last = state.batches_done == total_batches
        if state.global_step % run.log_every == 0:
            progress = (state.samples_done / feed.sampler.num_samples if feed else
                        state.batches_done / total_batches if total_batches else 0.0)  # a stream: length unknown
            _log_train(run, stats, clock, epoch + progress, bar)
        if last:
            continue  # the epoch-end checkpoint covers it; no break, so Accelerate's loader closes itself
        if watch.should_stop():
            clock.snapshot(stats)
            bar.close()
            return False
        if should_save_step(state.global_step, run.save_every_steps):
            clock.snapshot(stats)
            _save(run, reason="step", stats=stats)  # checks the loss so far: diverged weights are never saved
    bar.close()
    run.train_metrics = stats.reduce()
    clock.snapshot(None)
    return True


def _counts_items(run: FitRun) -> bool:
    """Whether the run's losses come as a sum and a count (weighed by _CountWeights) rather than per sample."""
    return run.task.token_level or getattr(run.compute, "counts_items", False)


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

    def snapshot(self, stats: TaskStats | None) -> None:
        elapsed = time.perf_counter() - self.started
        self.state.epoch_seconds = self.base_epoch + elapsed
        self.state.train_seconds = self.base_train + elapsed
        self.state.train_stats = stats.state_dict() if stats is not None else None


def _log_train(run: FitRun, stats: TaskStats, clock: _EpochClock, epoch_progress: float, bar: Any) -> None:
    """The interval's training loss, the exact mean over every rank's samples: the running loss sums and
    sample counts are all-reduced (one collective per log interval, none per step) and read once. A loss
    that is not finite on any rank stops the run here (Diverged)."""
    acc = run.accelerator
    # A copy: the all-reduce works in place, and `.double()` of a float64 buffer is the buffer itself.
    totals = stats.loss_and_items().to(torch.float64, copy=True)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)
    grad_norm = run.grad_norm if isinstance(run.grad_norm, torch.Tensor) else totals.new_full((1,), math.nan)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor
        grad_norm = grad_norm.full_tensor()
    loss_sum, seen, norm = torch.cat([totals, grad_norm.detach().reshape(1).to(totals)]).tolist()
    if not math.isfinite(loss_sum):
        _check_finite(run, {"training": loss_sum})
    mark_time, mark_samples, mark_loss, mark_seen = run.log_mark
    now = time.perf_counter()
    loss = (loss_sum - mark_loss) / max(seen - mark_seen, 1.0)
    lr = run.optimizer.param_groups[0]["lr"]
    rate = (clock.samples - mark_samples) * acc.num_processes / max(now - mark_time, 1e-9)
    metrics = {"loss": loss, "lr": lr, "samples_per_second": rate, "epoch": epoch_progress}
    if math.isfinite(norm):
        metrics["grad_norm"] = norm
    shown = {}
    if run.task.token_level:  # `seen` counts the tokens the loss covered, on every rank
        metrics.update(_token_rates(run, (seen - mark_seen) / max(now - mark_time, 1e-9)))
        shown["tok/s"] = f"{metrics['tokens_per_second']:.0f}"
    run.tracker.log_train(run.state.global_step, metrics)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", **shown, refresh=False)
    run.log_mark = (now, clock.samples, loss_sum, seen)


def _token_rates(run: FitRun, tokens_per_second: float) -> dict:
    """Tokens per second in total and per process, and MFU where fit was told the FLOPs and the peak."""
    per_process = tokens_per_second / run.accelerator.num_processes
    rates = {"tokens_per_second": tokens_per_second, "tokens_per_second_per_process": per_process}
    utilisation = run.throughput.mfu(per_process) if run.throughput is not None else None
    if utilisation is not None:
        rates["mfu"] = utilisation
    return rates


def _validate_and_record(run: FitRun, val_loader: Any, epoch: int) -> dict:
    acc, state = run.accelerator, run.state
    started = time.perf_counter()
    with run.watchdog.evaluating():
        val = _evaluate(run.model, val_loader, run.task, run.compute, run.metrics, acc, run.watchdog)
    row = {
        "epoch": epoch + 1,
        "step": state.global_step,
        # train_loss, the task's headline training metric, train_samples: each sample counted once
        **run.task.train_row(run.train_metrics),
        **val.as_row("val"),
        "lr": run.optimizer.param_groups[0]["lr"],
        "epoch_seconds": state.epoch_seconds + time.perf_counter() - started,  # train + validation
        # Exact global count of trained samples over this process's training time (ranks run in step).
        "samples_per_second": run.train_metrics.samples / state.train_seconds if state.train_seconds else 0.0,
        "world_size": acc.num_processes,
    }
    tokens = run.train_metrics.get("tokens") if run.task.token_level else None
    if tokens is not None:  # the epoch's exact global token count over its training time
        row.update(_token_rates(run, tokens / state.train_seconds if state.train_seconds else 0.0))
    if run.callbacks is not None:
        run.callbacks.validation_end(row)  # may add keys (EMA: val_ema_*) before the row is recorded
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
        own = "".join(f" val_{name} {row[f'val_{name}']:.4f}" for name in run.metrics.names()
                      if isinstance(row.get(f"val_{name}"), float))
        summary = (f"epoch {row['epoch']}: {run.task.summary(row)}{own} | lr {row['lr']:.2e} "
                   f"| {row['epoch_seconds']:.1f}s, {row['samples_per_second']:.0f} samples/s"
                   + (f", {row['tokens_per_second']:.0f} tokens/s" if "tokens_per_second" in row else "")
                   + (f", MFU {row['mfu']:.1%}" if "mfu" in row else ""))
        tqdm.write(summary)
    run.tracker.log_epoch(row)
    return row


def _update_best_and_patience(run: FitRun, row: dict, monitor: Monitor, early_stopping: EarlyStopping | None
                              ) -> bool:
    state, min_delta = run.state, early_stopping.min_delta if early_stopping else 0.0
    if _better(row[monitor.metric], state.best_value, monitor.mode, min_delta):
        state.best_value, state.best_epoch, state.bad_epochs = row[monitor.metric], row["epoch"], 0
    else:
        state.bad_epochs += 1
    return early_stopping is not None and state.bad_epochs >= early_stopping.patience
