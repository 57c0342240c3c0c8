"""What every recipe does around `fit`: flags, the process group, the output folder, the relaunch rules,
the claim on the folder, and how the processes leave.

A recipe (recipes/classify.py, recipes/lm.py) writes one function, `body(given, config, output_dir, lease)`,
that builds its data, model and task and calls `fit`; `main(body, ...)` runs it with everything below
around it, the same way for every recipe:

1. the flags are parsed into the recipe's config dataclass (every value checked before anything starts);
2. the process group starts first (bounded by --init-timeout), so that rank 0 can decide for all;
3. rank 0 picks the output folder and every rank uses it; a second launch on a folder in use stops here;
4. `relaunch` and `open_run`, called by the body: the checkpoint to continue from, this launch's flags
   checked against the ones stored in it (docs/relaunch.md), a checkpoint that does not fit the model
   skipped, newer checkpoints set aside, the W&B run, config.json, and fit's Checkpointing;
5. a UsageError or RunStopped becomes one line on rank 0 and its exit code on every rank; the ranks leave
   together (barrier, then the group is destroyed), and `exit_now` skips the interpreter's teardown.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from launcher.checkpoint import loadable_checkpoint, read_trainer_state, write_json_atomic
from launcher.checkpoint.relaunch import check_data, choose_checkpoint, data_record, describe_abandoned, \
    is_epoch_end, reconcile, set_aside_newer, stored_config, stored_data
from launcher.checkpoint.sharded import is_sharded_checkpoint
from launcher.config import TrainConfig, parse_values
from launcher.data.fingerprint import data_change, forget_launch_fingerprints, launch_fingerprint
from launcher.errors import EXIT_USAGE, RunStopped, UsageError
from launcher.faults.gloo_exit import run_exit_handlers
from launcher.faults.lease import claim_for_ranks
from launcher.faults.write_failures import main_writes
from launcher.loop.accelerator import start_process_group
from launcher.loop.options import Checkpointing
from launcher.loop.outputs import sweep_stale_temp
from launcher.tracking.tracker import start_tracker

Body = Callable[[dict, Any, Path, Any], None]


def choose_output_dir(config: TrainConfig) -> Path:
    """Rank 0 picks the folder (a timestamp by default) and every rank uses the same one; a path that cannot
    be a folder (a file, or inside one) is a UsageError on every rank."""
    folder = config.resolved_output_dir()
    chosen = [str(folder), not_a_folder(folder) if PartialState().is_main_process else None]
    broadcast_object_list(chosen, from_process=0)
    if chosen[1]:
        raise UsageError(chosen[1])
    return Path(chosen[0])


def not_a_folder(folder: Path) -> str | None:
    """Why --output-dir cannot be a folder (it, or a folder above it, is a file), or None."""
    path = Path(os.path.abspath(folder))
    for above in (path, *path.parents):
        if above.exists() and not above.is_dir():
            what = "is a file, not a folder" if above == path else f"is inside {above}, which is a file, not a folder"
            return f"--output-dir {folder} {what}: pass a folder to write the run to, or move the file away"
        if above.exists():
            return None
    return None


def relaunch(given: dict, config: TrainConfig, output_dir: Path) -> tuple[TrainConfig, Path | None, dict]:
    """The checkpoint rank 0 chose, and this launch's config checked against the one stored in it
    (docs/relaunch.md): keys not given come from the checkpoint, changes are applied or refused."""
    checkpoint = choose_checkpoint(config.resume, output_dir)
    if checkpoint is None:
        return config, None, {}
    stored, state = stored_config(checkpoint)
    config, notices = reconcile(given, stored, checkpoint=checkpoint, mid_epoch=not is_epoch_end(state),
                                eval_only=config.eval_only, cls=type(config))
    previous, _ = stored_data(state)  # data changed under the same --dataset: refused unless accepted
    if previous:
        notices.append(check_data(config, data_change(previous, launch_fingerprint(
            config.dataset, config.dataset_config)), checkpoint))
    for line in filter(None, notices):
        PartialState().print(line)
    return config, checkpoint, state


def branch_from(config: TrainConfig, checkpoint: Path | None, output_dir: Path) -> Path | None:
    """Resuming an older checkpoint of this folder: rank 0 sets the newer ones aside (never deletes them).

    Returns the checkpoint's real folder: checkpoints/best may be re-pointed to follow the new branch.
    """
    if checkpoint is None or config.eval_only:
        return checkpoint
    state = PartialState()
    real = checkpoint.resolve() if checkpoint.is_symlink() else checkpoint
    state.wait_for_everyone()  # every rank has followed the link before rank 0 may move it
    if state.is_main_process:
        folder = set_aside_newer(real, output_dir)
        if folder is not None:
            print(describe_abandoned(folder, real))
    state.wait_for_everyone()
    return real


def open_run(config: TrainConfig, accelerator: Any, output_dir: Path, checkpoint: Path | None, resumed: dict, *,
             model: torch.nn.Module, optimizer: torch.optim.Optimizer, info: dict, lease: Any,
             export_final: Callable | None = None) -> tuple[Checkpointing, Any]:
    """From here on the output folder is written: (fit's Checkpointing, the tracker).

    A checkpoint that validates but does not fit this model is skipped (--resume auto falls back to an
    older one; a sharded checkpoint is checked by DCP as it loads, into the sharded model); newer
    checkpoints are set aside when an older one is resumed; the W&B run continues the checkpoint's;
    config.json holds the config and the run's facts (`info`)."""
    loadable = checkpoint if checkpoint is None or is_sharded_checkpoint(checkpoint) else loadable_checkpoint(
        checkpoint, model=model, optimizer=optimizer, fallback=config.resume == "auto", output_dir=output_dir,
        is_main=accelerator.is_main_process)
    if loadable != checkpoint:
        checkpoint, resumed = loadable, read_trainer_state(loadable) if loadable else {}
    previous, changes = stored_data(resumed)  # a Hub revision that loading moved is refused here, unwritten
    current = launch_fingerprint(config.dataset, config.dataset_config, again=True)
    change = data_change(previous, current)
    if checkpoint is not None:
        check_data(config, change, checkpoint)
    checkpoint = branch_from(config, checkpoint, output_dir)
    tracker = start_tracker(config, accelerator=accelerator, output_dir=output_dir, run_info=info,
                            resume_run_id=resumed.get("extra", {}).get("wandb_run_id"),
                            history=resumed.get("history"))
    stored = {"config": config.to_dict(), "run_info": info,
              **data_record(config, current, previous, changes, change)}
    main_writes(accelerator.is_main_process, output_dir, "config.json",
                lambda: write_json_atomic(output_dir / "config.json", stored))
    accelerator.print(f"distributed: {info['distributed_type']}, {info['world_size']} processes on "
                      f"{info['device']}, mixed precision {info['mixed_precision']}")
    checkpointing = Checkpointing(
        output_dir, save_every_steps=config.save_every_steps, keep_last=config.keep_last, resume_from=checkpoint,
        config=stored, extra_state={"wandb_run_id": tracker.run_id}, lease=lease, export_final=export_final)
    return checkpointing, tracker


def launch(body: Body, argv: list[str] | None, *, cls: type = TrainConfig, description: str | None = None) -> None:
    """Flags, process group, output folder and its claim, then `body`; the claim is released at the end."""
    given = parse_values(argv, description=description, cls=cls)
    config = cls(**given)  # every flag is checked here, before anything starts or is read
    # The process group first (bounded by --init-timeout), so that rank 0 can decide for all.
    state = start_process_group(collective_timeout=config.collective_timeout, init_timeout=config.init_timeout,
                                deterministic=config.deterministic)
    output_dir = choose_output_dir(config)
    # One run per folder: a second launch on it stops here, before it reads or writes anything of it.
    lease = None if config.eval_only else claim_for_ranks(output_dir, is_main=state.is_main_process,
                                                          force=config.force)
    if lease is not None and state.is_main_process:  # the folder is ours: what killed runs left goes
        sweep_stale_temp(output_dir)
    forget_launch_fingerprints()  # the data's fingerprint is taken once per launch (docs/relaunch.md)
    try:
        body(given, config, output_dir, lease)
    finally:
        if lease is not None:
            lease.release()


def main(body: Body, argv: list[str] | None = None, *, cls: type = TrainConfig, description: str | None = None,
         prog: str = "recipe") -> int:
    """`launch`, with bad input and stopped runs turned into one line on rank 0 and an exit code."""
    try:
        launch(body, argv, cls=cls, description=description)
        code = 0
    except UsageError as err:  # raised alike on every rank: the checks are deterministic
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"{prog}: error: {err}", file=sys.stderr)
        code = EXIT_USAGE
    except RunStopped as err:  # raised together on every rank (a failed write, a lost claim)
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"{prog}: error: {err}", file=sys.stderr)
        code = err.exit_code
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Leave together: a rank that tears its group down while a peer is still writing files can take the
        # peer's connection down with it, and torchrun's exit barrier wants every node to finish cleanly.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return code


def exit_now(code: int) -> None:
    """Leave without the interpreter's own teardown: everything is written, the trackers are finished and the
    process group is gone, and in that teardown gloo's background threads once aborted a finished rank
    ("terminate called without an active exception", 1 in about 400 test launches), turning a completed
    run into a failed one for torchrun. The exit handlers still run first (wandb's temp folders and service,
    tempfile's folders, the gloo wait: launcher.faults.gloo_exit.run_exit_handlers)."""
    run_exit_handlers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
