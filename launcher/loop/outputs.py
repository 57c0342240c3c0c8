"""What `fit` writes: checkpoints, the final model, metrics.jsonl, and the finiteness checks that stop a
diverged run (`Diverged`) before anything is saved; and `sweep_stale_temp`, which removes what a killed
run's writers left behind.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import errno
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from launcher.checkpoint import checkpoint_name, plain_state_dict, save_weights, write_json_atomic, write_text_atomic
from launcher.checkpoint.sharded import full_model_state, is_sharded_model, save_sharded
from launcher.errors import EXIT_DIVERGED, RunStopped, UsageError, WriteFailed
from launcher.faults.agreement import first_failing_rank, from_rank
from launcher.faults.write_failures import cause_of, main_writes, mount_point
from launcher.loop.callbacks import checkpoint_files
from launcher.loop.state import FitRun
from launcher.tasks.base import TaskStats
from launcher.tracking.tracker import process_gone, sweep_wandb_core_leftovers, sweep_wandb_staging


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


def _check_finite(run: FitRun, losses: Mapping[str, float | str]) -> None:
    """Stop the run (Diverged) when a loss that every rank agrees on is not finite."""
    for what, value in losses.items():
        if isinstance(value, str) or not math.isfinite(value):
            raise Diverged(f"the {what} loss is {value} at step {run.state.global_step} (epoch {run.state.epoch + 1}); "
                           f"nothing was saved from this point; lower --lr or clip gradients (--max-grad-norm), and "
                           f"start a fresh run or --resume an earlier checkpoint", run.state.global_step)


def _weights_bad_here(model: torch.nn.Module) -> bool:
    """Whether this rank's parameters (its shards under FSDP, nothing is gathered) hold a non-finite value:
    one host read, only at saves."""
    local = [getattr(p, "_local_tensor", p) for p in model.parameters() if p.is_floating_point()]
    return bool(local) and bool(torch.stack([~torch.isfinite(t).all() for t in local]).any().item())


def _weights_finite(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether every rank's parameters are finite: this rank's own and one tiny all-reduce."""
    bad = torch.tensor([float(_weights_bad_here(model))], device=device)  # NCCL reduces only device tensors
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad)
    return not bad.item()


def _check_finite_local(run: FitRun, stats: TaskStats) -> None:
    """The training loss so far, agreed across ranks (one tiny all-reduce; only where the loop syncs anyway)."""
    bad = (~torch.isfinite(stats.loss_view)).to(stats.buffer.dtype)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad)
    if bad.item():
        local = stats.loss_view.item()
        _check_finite(run, {"training": local if not math.isfinite(local) else "not finite on another process"})


def _save(run: FitRun, *, reason: str, best: bool = False, stats: TaskStats | None = None) -> None:
    """Write a checkpoint (every rank calls this); at epoch ends, also maintain best/ and rotation.
    `stats`: the epoch's running statistics, whose training loss is checked (mid-epoch saves)."""
    run.last_checkpoint = None
    if run.manager is None:
        return
    with run.watchdog.slow():
        _write_checkpoint(run, reason, best, stats)


def _write_checkpoint(run: FitRun, reason: str, best: bool, stats: TaskStats | None = None) -> None:
    acc, state = run.accelerator, run.state
    loss_here = stats.loss_view.item() if stats is not None else 0.0
    flags = [float(_weights_bad_here(run.model)), float(not math.isfinite(loss_here))]

    def check(sums: list[float]) -> None:
        # A checkpoint of diverged weights would be resumed. The loss so far can be finite while the last
        # update already made the weights NaN: never save those either.
        if sums[1]:
            _check_finite(run, {"training": loss_here if not math.isfinite(loss_here) else
                                "not finite on another process"})
        if sums[0]:
            _check_finite(run, {"training": "finite, but the weights are not"})

    state.reason = reason
    if best:
        state.best_checkpoint = checkpoint_name(state.global_step)
    # Each rank's own stream position goes into its own file of the checkpoint: no collective, no rank
    # receives another's (launcher.checkpoint.rank_state).
    loader_state = run.stateful_loader.state_dict() if run.stateful_loader is not None else None
    scheduler = run.step_sched.scheduler if run.step_sched is not None else run.plateau
    # The callbacks' state: JSON into state.extra, tensors into callbacks.safetensors (launcher.loop.callbacks).
    extra_files, extra_tensors = checkpoint_files(run.callbacks, state, sharded=is_sharded_model(run.model))
    if is_sharded_model(run.model):  # every rank writes its own shards (launcher.checkpoint.sharded)
        if stats is not None:
            _check_finite_local(run, stats)
        if not _weights_finite(run.model, acc.device):
            check([1.0, 0.0])
        path = save_sharded(run.manager, state, model=acc.unwrap_model(run.model),
                            optimizer=run.optimizer, scheduler=scheduler, scaler=acc.scaler,
                            best=best, failure=run.write_failure, loader_state=loader_state,
                            extra_tensors=extra_tensors)
    else:  # the checks ride on the save's one reduction
        path = run.manager.save(state, model_state=acc.get_state_dict(run.model), optimizer=run.optimizer,
                                scheduler=scheduler, scaler=acc.scaler, best=best, failure=run.write_failure,
                                flags=flags, check=check, loader_state=loader_state, extra_files=extra_files)
    run.last_checkpoint = path
    run.manager.rotate(protect=state.best_checkpoint)
    log_checkpoint = getattr(run.tracker, "log_checkpoint", None)  # optional in a user's own Tracker
    if log_checkpoint is not None:
        log_checkpoint(path, step=state.global_step, best=best)  # --wandb-log-model checkpoints
        # Rank 0 may have spent a while staging the folder as an artifact: the others wait here, inside the
        # save's generous timeout, not in the next training step's tight one.
        acc.wait_for_everyone()


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
        tmp = final / f".model.safetensors.tmp-{os.getpid()}"
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


# The writers' temp names: `.NAME.tmp-PID` (write_text_atomic, write_json_atomic, write_parquet_atomic, the
# export), `.NAME.tmp` (final/.hf.tmp of the HF export, and final/.model.safetensors.tmp before it had a pid).
# checkpoints/.tmp-step-*, .trash-*, .best-* are the checkpoint manager's, removed by its clean_stale in fit.
_TEMP_NAME = re.compile(r"^\..+\.tmp(?:-(\d+))?$")


def _stale(path: Path, pidless_too: bool) -> bool:
    match = _TEMP_NAME.match(path.name)
    if match is None or path.is_symlink():
        return False
    if match.group(1) is None:
        return pidless_too
    pid = int(match.group(1))
    return pid != os.getpid() and process_gone(pid)


def sweep_stale_temp(output_dir: Path) -> list[Path]:
    """Rank 0 at the start of a run that holds the folder's lease: remove the temp files and folders a killed
    run left (a SIGKILL between a temp file's write and its rename leaves `final/.trainer_state.json.tmp-PID`
    for ever), and wandb's temp folders of dead processes (launcher.tracking.tracker). Returns what was removed.

    Only writer temp names are touched: `.NAME.tmp-PID` whose PID is not alive (on this host; the lease keeps
    other hosts' training runs out), anywhere in the folder's top, final/ and checkpoints/ (and each checkpoint
    folder); `.NAME.tmp` without a pid only in final/ and checkpoints/, where only the lease holder writes (an
    --eval-only of the folder writes eval.json at the top and claims nothing). A failure to remove one is
    ignored: a sweep never stops a launch."""
    output_dir = Path(output_dir)
    places: list[tuple[Path, bool]] = [(output_dir, False), (output_dir / "final", True)]
    checkpoints = output_dir / "checkpoints"
    places.append((checkpoints, True))
    try:
        places += [(p, True) for p in checkpoints.iterdir() if p.is_dir() and not p.is_symlink()
                   and not _TEMP_NAME.match(p.name)]
    except OSError:
        pass
    removed = []
    for folder, pidless_too in places:
        try:
            entries = list(folder.iterdir())
        except OSError:
            continue
        for path in entries:
            if not _stale(path, pidless_too):
                continue
            try:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except OSError:
                continue
            removed.append(path)
    removed += sweep_wandb_staging(output_dir)
    removed += sweep_wandb_core_leftovers()
    return removed


# ---------------------------------------------------------------------------------------------------------
# --eval-only outputs: eval.json and --predictions


def root_cause(err: BaseException) -> BaseException:
    """The first error of a chain raised while handling another (a cleanup's unlink that fails after the
    write it cleans up failed): the one that says what went wrong, which the later one must never hide."""
    seen = {id(err)}
    while err.__context__ is not None and not err.__suppress_context__ and id(err.__context__) not in seen:
        err = err.__context__
        seen.add(id(err))
    return err


_USERS_SETUP = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.ENOTDIR: "not a directory",
                errno.EISDIR: "is a directory"}


def eval_write_failed(err: BaseException, path: Path, what: str, flag: str) -> Exception:
    """The one-line error for an --eval-only output that could not be written. A path that cannot be written
    at all (read-only, no permission, a file where a folder must be) is the user's setup: UsageError (exit 2)
    naming the flag. Anything else (a full disk, an I/O error) is WriteFailed (exit 74). Either way the advice
    is to rerun the evaluation: it writes nothing that training or --resume needs."""
    cause_err = root_cause(err)
    code = getattr(cause_err, "errno", None)
    where = f"{path} (filesystem {mount_point(path)})"
    if code in _USERS_SETUP:
        return UsageError(f"cannot write {what} to {where}: {_USERS_SETUP[code]}; pass a writable {flag} "
                          f"and run the same --eval-only command again")
    cause = cause_of(cause_err, path)
    fix = "free space" if cause in ("no space left on device", "disk quota exceeded") else "fix the cause above"
    return WriteFailed(f"cannot write {what} to {where}: {cause}; the evaluation itself finished and the checkpoint "
                       f"is untouched: {fix}, then run the same --eval-only command again")


def eval_writes(is_main: bool, path: Path, what: str, write: Callable[[], None], *, flag: str) -> None:
    """Rank 0 runs `write` (an --eval-only output); every rank returns together, or raises the same one-line
    error together (UsageError or WriteFailed, see eval_write_failed): no rank waits in a collective."""
    failure: Exception | None = None
    if is_main:
        try:
            write()
        except RunStopped as err:
            failure = err
        except Exception as err:  # noqa: BLE001 - any failure of the write is reported the same way
            failure = eval_write_failed(err, Path(path), what, flag)
    rank = first_failing_rank(failure is not None)
    if rank is None:
        return
    kind, message = from_rank(None if failure is None else (type(failure).__name__, str(failure)), rank)
    kinds: dict[str, type[Exception]] = {"UsageError": UsageError, "WriteFailed": WriteFailed}
    raise kinds.get(kind, RunStopped)(message)
