"""Resuming a run from a checkpoint: restoring state (at the same or another world size), the re-planned
schedule, and runs that had already finished.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from accelerate.utils import set_seed

from launcher.checkpoint import (
    CheckpointError,
    TrainerState,
    apply_checkpoint,
    first_error,
    read_checkpoint,
    read_trainer_state,
    restore_rng,
    validated_once,
)
from launcher.checkpoint.rank_state import read_rank_rng, sum_saved
from launcher.checkpoint.sharded import check_resume_format, is_sharded_checkpoint, is_sharded_model, load_sharded
from launcher.errors import UsageError
from launcher.loop.callbacks import loaded_state, read_callback_tensors
from launcher.loop.outputs import _rewrite_metrics, _write_final
from launcher.loop.state import FitRun
from launcher.schedulers import replan


def _resume(run: FitRun, path: Path) -> None:
    """Load the checkpoint on every rank, all or nothing: every rank checks what it read first, and only
    when all ranks could (one all-reduce) does any rank apply it. Rank 0 alone checks the manifest (sizes,
    sha256; not again when it chose this checkpoint itself), each rank reads the weights and its own files once."""
    acc = run.accelerator
    check_resume_format(path, sharded_run=is_sharded_model(run.model))
    scheduler = run.step_sched.scheduler if run.step_sched is not None else run.plateau
    callback_tensors: dict = {}  # callbacks.safetensors (launcher.loop.callbacks); sharded: in the DCP shards
    if is_sharded_checkpoint(path):  # DCP reshards: any world size, FSDP or plain model
        error = _validation_error(path) if acc.is_main_process else None
        error = first_error(error)  # DCP's load is collective: every rank must know before it starts
        if error is not None:
            raise UsageError(f"cannot resume from {path}: {error}")
        state, rng, stats, loader_state = load_sharded(
            path, model=acc.unwrap_model(run.model), optimizer=run.optimizer, scheduler=scheduler,
            scaler=acc.scaler, rank=acc.process_index, verify=False)
        if run.callbacks is not None:  # their tensors are in the DCP shards: loaded once set up (train_start)
            run.callbacks.sharded_from = path
    else:
        targets = {"model": acc.unwrap_model(run.model, keep_torch_compile=False), "optimizer": run.optimizer,
                   "scheduler": scheduler, "scaler": acc.scaler}
        loaded, error = None, None
        try:
            if acc.is_main_process:
                validated_once(path)  # the other ranks read meanwhile; nothing is applied before the verdict
            loaded = read_checkpoint(path, rank=acc.process_index, verify=False, **targets)
            if run.callbacks is not None:
                callback_tensors = read_callback_tensors(path)
        except (CheckpointError, UsageError, OSError) as err:  # unverified here: any damage, one verdict
            error = str(err)
        error = first_error(error)
        if error is not None:
            raise UsageError(f"cannot resume from {path}: {error}")
        apply_checkpoint(loaded, **targets)
        state, rng, stats, loader_state = loaded.state, loaded.rng, loaded.stats, loaded.loader
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
    # Checkpoints written before the positions moved to each rank's own file kept every rank's here; read
    # them, and drop them so later checkpoints do not carry a stale copy.
    loaded_state(run.callbacks, state.extra, callback_tensors)  # restored by the callbacks' train_start
    gathered = state.extra.pop("loader_states", None)
    if loader_state is None and gathered and acc.process_index < len(gathered):
        loader_state = gathered[acc.process_index]
    run.state = TrainerState(**{**state.__dict__, "world_size": acc.num_processes,
                                "config": run.state.config or state.config,
                                "extra": {**state.extra, **run.state.extra}})
    run.rng_to_restore, run.resumed_stats, run.resumed_from = rng, stats, path
    if run.stateful_loader is not None and loader_state is not None and state.world_size == acc.num_processes:
        # Another world size splits the stream differently: the interrupted epoch restarts (warned above).
        run.stateful_loader.load_state_dict(loader_state)
    if rng is not None and (run.state.batches_done == 0 or sampler is not None):
        # The next epoch starts, or (an elastic loader, whose iterator draws nothing from the global RNG)
        # the epoch continues, exactly where the saved run was.
        restore_rng(rng)
        run.rng_to_restore = None
    if run.output_dir is not None and acc.is_main_process:
        _rewrite_metrics(run.output_dir, run.state.history)
    acc.print(f"resumed from {path} (epoch {run.state.epoch + 1}, step {run.state.global_step}, "
              f"{run.state.batches_done} batches, {run.state.samples_done} samples into the epoch)")


def _validation_error(path: Path) -> str | None:
    try:
        validated_once(path)
    except CheckpointError as err:
        return str(err)
    return None


def _elastic_resume(run: FitRun, path: Path, state: TrainerState, stats: dict | None,
                    rng: dict | None) -> tuple[dict | None, dict | None]:
    """Resume a checkpoint of another world size with an elastic loader: the epoch continues at
    `samples_done`, so every remaining sample is seen exactly once (not bit-identical: the global batch and
    the ranks' random streams differ). Returns this rank's (partial-epoch statistics, RNG state)."""
    acc, sampler = run.accelerator, run.train_sampler
    if state.samples_done:
        # The saved statistics, summed, go to rank 0, so the epoch's all-reduce counts each once.
        stats = sum_saved(read_trainer_state(path)) if acc.is_main_process else None
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


def _derived_seed(path: Path, rank: int) -> int:
    generator = torch.Generator()
    generator.set_state(read_rank_rng(path, 0)["torch"])
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
