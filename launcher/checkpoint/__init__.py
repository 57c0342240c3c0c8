"""Checkpoints that lose nothing: complete state, written atomically by rank 0, validated on load.

Layout of one checkpoint, `<output_dir>/checkpoints/step-00000420/`:

    model.safetensors   weights (unwrapped model, safetensors: nothing is unpickled on load)
    optimizer.pt        optimizer state_dict     } torch.save of plain tensors/numbers,
    scheduler.pt        LR scheduler state_dict  } loaded with weights_only=True
    scaler.pt           fp16 grad scaler (only with fp16)
    rng.pt              python/numpy/torch/CUDA RNG states of rank 0; rng-00001.pt ... of the other ranks,
                        each written by its rank (rank_state)
    trainer_state.json  epoch, position inside the epoch, global step, history, best/early-stopping
                        state, the resolved config and `extra` (e.g. the W&B run id)
    manifest.json       written last: file sizes and sha256, step. No manifest, no checkpoint.

Every rank takes part in `save` (each writes its own RNG file, one all-reduce sums the partial-epoch
statistics that rank 0 stores), rank 0 writes the shared files, into
`checkpoints/.tmp-step-.../`, fsyncs, renames it into place and fsyncs the folder; then all ranks learn
together whether it worked (launcher.faults.write_failures.agree). A failed write removes its temp folder and
raises WriteFailed on every rank; the earlier checkpoints and `best` are untouched.

Weights are stored under the plain model's names (`plain_state_dict`): no `_orig_mod.` from torch.compile,
no `module.` from DDP, so any checkpoint loads into the recipe's model, compiled or not.

Loading is all or nothing: `read_checkpoint` checks every file against the model, optimizer, scheduler
and scaler before `apply_checkpoint` changes any of them.

The package, one concern per module (a name is looked up, and so patched, in the module that uses it):
- `layout`: the files' names, TrainerState, CheckpointError/CheckpointMismatch, plain_state_dict, the step
  folders (checkpoint_name, checkpoints_dir, list_checkpoints) and the manifest check (validate);
- `files`: durable writes (fsync, write_json_atomic, write_text_atomic, append_line_durable), sha256,
  save_weights;
- `rng`: capture_rng and restore_rng, a process's RNG states;
- `collective`: the barrier, first_error, rank 0's verdict for all (no-ops in a single process; O(1) per rank);
- `rank_state`: what each rank contributes: its own RNG file, the training statistics summed;
- `manager`: CheckpointManager: saving on every rank, the atomic write by rank 0, rotation, `best`;
- `loading`: read_checkpoint, apply_checkpoint, load_checkpoint, read_weights, load_model_weights and the
  checks of the weights, optimizer, scheduler and scaler against this run;
- `resume`: which checkpoint to resume from: resolve_resume, latest_valid, loadable_checkpoint;
- `sharded`: FSDP checkpoints: every rank writes its DCP shards, one commit; load with resharding
  (imported on first use: torch.distributed.checkpoint is slow to import);
- `export`: `launcher export CHECKPOINT OUT.safetensors`, any checkpoint to one plain file;
- `relaunch`: what a relaunch may change: rank 0 chooses the checkpoint, the stored config is reconciled
  with the command line, newer checkpoints are set aside.
"""

from launcher.checkpoint.collective import first_error
from launcher.checkpoint.files import _fsync_path as _fsync_path
from launcher.checkpoint.files import _sha256 as _sha256
from launcher.checkpoint.files import append_line_durable, save_weights, write_json_atomic, write_text_atomic
from launcher.checkpoint.layout import (
    CHECKPOINTS,
    COMPILE_PREFIX,
    FAULT_ENV,
    FORMAT_VERSION,
    LEASE_PREFIX,
    MANIFEST,
    STALE_VIEW_ENV,
    TRAINER_STATE,
    CheckpointError,
    CheckpointMismatch,
    TrainerState,
    checkpoint_name,
    checkpoints_dir,
    list_checkpoints,
    plain_state_dict,
    validate,
    validated_once,
)
from launcher.checkpoint.loading import (
    LoadedCheckpoint,
    apply_checkpoint,
    check_fits,
    check_optimizer_state,
    check_weights,
    load_checkpoint,
    load_model_weights,
    read_checkpoint,
    read_trainer_state,
    read_weights,
)
from launcher.checkpoint.manager import CheckpointManager
from launcher.checkpoint.resume import UNLOADABLE_PREFIX, latest_valid, loadable_checkpoint, resolve_resume
from launcher.checkpoint.rng import capture_rng, restore_rng

__all__ = [
    "CHECKPOINTS",
    "COMPILE_PREFIX",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointMismatch",
    "FAULT_ENV",
    "FORMAT_VERSION",
    "LEASE_PREFIX",
    "LoadedCheckpoint",
    "MANIFEST",
    "STALE_VIEW_ENV",
    "TRAINER_STATE",
    "TrainerState",
    "UNLOADABLE_PREFIX",
    "append_line_durable",
    "apply_checkpoint",
    "capture_rng",
    "check_fits",
    "check_optimizer_state",
    "check_weights",
    "checkpoint_name",
    "checkpoints_dir",
    "first_error",
    "latest_valid",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_weights",
    "loadable_checkpoint",
    "plain_state_dict",
    "read_checkpoint",
    "read_trainer_state",
    "read_weights",
    "resolve_resume",
    "restore_rng",
    "save_weights",
    "validate",
    "validated_once",
    "write_json_atomic",
    "write_text_atomic",
]
