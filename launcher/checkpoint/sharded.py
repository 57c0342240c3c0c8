"""Sharded checkpoints for FSDP runs: every rank writes its own shards with torch.distributed.checkpoint (DCP).

Layout of one sharded checkpoint, `<output_dir>/checkpoints/step-00000420/`:

    dcp/.metadata        DCP's index of every tensor shard (written by rank 0 once all ranks wrote theirs)
    dcp/__R_0.distcp     rank R's shards of the model ("model.*") and of the optimizer state ("optimizer.*")
    scheduler.pt, scaler.pt, trainer_state.json   as in launcher.checkpoint (rank 0, small)
    rng.pt, rng-00001.pt, ...   each rank's RNG states, written by that rank (launcher.checkpoint.rank_state)
    manifest.json        written last: every file with its size ("sharded": true, the writing world size)

Nothing is gathered whole: each rank serializes only its local shards, in parallel. The folder is written
under `checkpoints/.tmp-step-...-sharded/` (one name for all ranks), the ranks report success to each other
(an all-gathered flag), and only then rank 0 writes the manifest and renames the folder into place, the same
commit launcher.checkpoint uses. A kill at any moment leaves either no folder under the final name or a
complete one, so the previous checkpoint stays the newest valid one.

The manifest records sizes, and sha256 only for the small files: hashing every shard would read the whole
model and optimizer state back on every save and on every rank at resume (measured in bench/RESULTS.md),
while truncation, the failure a crash or a full disk produces, is caught by the sizes.

DCP reshards on load: a checkpoint written by N processes loads on M, into FSDP-sharded or plain (DDP,
single-process) models alike; `export_weights` turns one into a single safetensors file in one process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate.optimizer import AcceleratedOptimizer

from launcher.checkpoint import (
    FAULT_ENV,
    FORMAT_VERSION,
    MANIFEST,
    TRAINER_STATE,
    CheckpointError,
    CheckpointManager,
    TrainerState,
    _fsync_path,
    _sha256,
    capture_rng,
    checkpoint_name,
    load_model_weights,
    save_weights,
    validate,
)
from launcher.checkpoint.loading import trainer_state_of
from launcher.checkpoint.rank_state import STATS_REDUCED, read_rank_file, reduce_with_flags, write_rank_rng
from launcher.errors import LeaseLost, RunStopped, UsageError
from launcher.faults.write_failures import agree, write_failed

DCP_DIR = "dcp"
MODEL_PREFIX = "model."


def _dcp():
    """torch.distributed.checkpoint, imported when first needed: the import takes ~0.8 s of every process's
    start-up, and only FSDP runs and sharded exports use it."""
    import torch.distributed.checkpoint as dcp
    import torch.distributed.checkpoint.api  # noqa: F401 - dcp.api and dcp.state_dict below
    import torch.distributed.checkpoint.state_dict  # noqa: F401

    return dcp


def is_sharded_model(model: torch.nn.Module) -> bool:
    """True for a model sharded with FSDP2 (`fully_shard` turns modules into FSDPModule subclasses)."""
    if "torch.distributed.fsdp" not in sys.modules:  # nothing was sharded with a module no one imported
        return False
    from torch.distributed.fsdp import FSDPModule

    inner = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    return any(isinstance(m, FSDPModule) for m in inner.modules())


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / DCP_DIR).is_dir()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's AcceleratedOptimizer: what DCP's state-dict API expects."""
    return optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer) else optimizer


def _barrier() -> None:
    if _world() > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------- writing


def save_sharded(manager: CheckpointManager, state: TrainerState, *, model: torch.nn.Module, optimizer: Any,
                 scheduler: Any = None, scaler: Any = None, best: bool = False,
                 failure: RunStopped | None = None, loader_state: dict | None = None) -> Path:
    """Write one complete sharded checkpoint (and point `best` at it). Every rank calls this.

    The same promises as CheckpointManager.save: a failed write (any rank) raises WriteFailed on every rank
    together and leaves the earlier checkpoints as they were; a lost lease stops the run before any rank
    writes. `failure`: an earlier failed write of this rank (the metrics line), reported instead of writing.
    """
    optimizer = _torch_optimizer(optimizer)
    train_stats, _ = reduce_with_flags(state.train_stats, [])  # summed: rank 0 stores them (rank_state)
    name = checkpoint_name(state.global_step)
    final, tmp = manager.root / name, manager.root / f".tmp-{name}-sharded"
    if failure is None and manager.is_main:
        try:
            if manager.lease is not None:
                manager.lease.check()  # a stale writer never overwrites what the folder's new owner wrote
            manager.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        except LeaseLost as err:
            failure = err
        except OSError as err:
            failure = write_failed(err, manager.root, f"checkpoint {name}")
    agree(failure)  # the folder exists before any rank writes into it, or every rank stops here
    try:
        dcp = _dcp()
        shards = {"model": dcp.state_dict.get_model_state_dict(model),
                  "optimizer": dcp.state_dict.get_optimizer_state_dict(model, optimizer)}
        dcp.save(shards, checkpoint_id=tmp / DCP_DIR)  # FileSystemWriter fsyncs every file it writes
        # each rank its own file (RNG, its own sums, its loader's position); committed after the next agree
        write_rank_rng(tmp, _rank(), capture_rng(), state.train_stats, loader_state)
        if os.environ.get(FAULT_ENV) == str(state.global_step) and _rank() == _world() - 1:
            os.kill(os.getpid(), signal.SIGKILL)  # test-only: one rank dies with its shards written
        if manager.is_main:
            _write_small_files(tmp, state, train_stats, scheduler, scaler)
    except BaseException as err:  # noqa: B036 - DCP's CheckpointException derives from BaseException
        if not isinstance(err, (Exception, _dcp().api.CheckpointException)):
            raise  # KeyboardInterrupt, SystemExit: not a write failure
        failure = write_failed(err, manager.root, f"checkpoint {name}")
    agree(_discarded(failure, tmp, manager.is_main))  # every rank's shards are on disk before any commit
    if manager.is_main:
        try:
            _commit(tmp, final, state)
            if best:
                manager.mark_best(final.name)
        except OSError as err:
            failure = write_failed(err, manager.root, f"checkpoint {name}")
    agree(_discarded(failure, tmp, manager.is_main))  # nobody goes on before the checkpoint is committed
    return final


def _discarded(failure: RunStopped | None, tmp: Path, is_main: bool) -> RunStopped | None:
    """After a failed write rank 0 removes the temporary folder: nothing left that could pass for a checkpoint."""
    if failure is not None and is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    return failure


def _write_small_files(tmp: Path, state: TrainerState, train_stats: dict | None, scheduler: Any,
                       scaler: Any) -> None:
    payload = asdict(state)
    payload["train_stats"] = train_stats  # every rank's, summed
    payload[STATS_REDUCED] = True
    files = {TRAINER_STATE: lambda p: Path(p).write_text(json.dumps(payload, indent=1))}
    if scheduler is not None:
        files["scheduler.pt"] = lambda p: torch.save(scheduler.state_dict(), p)
    if scaler is not None:
        files["scaler.pt"] = lambda p: torch.save(scaler.state_dict(), p)
    for fname, write in files.items():
        write(str(tmp / fname))
        _fsync_path(tmp / fname)


def _commit(tmp: Path, final: Path, state: TrainerState) -> None:
    """Manifest last, then one rename: the folder under its final name is complete or absent."""
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        rel = path.relative_to(tmp).as_posix()
        files[rel] = {"size": path.stat().st_size}
        if not rel.startswith((f"{DCP_DIR}/", "rng-")):  # other ranks' files: sizes, as for shards
            files[rel]["sha256"] = _sha256(path)
    manifest = {"format": FORMAT_VERSION, "step": state.global_step, "epoch": state.epoch,
                "batches_done": state.batches_done, "reason": state.reason, "sharded": True,
                "world_size": _world(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
    with open(tmp / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_path(tmp / DCP_DIR)
    _fsync_path(tmp)
    root = final.parent
    if final.exists():  # the same step saved again (e.g. after a resume): replace it whole
        trash = root / f".trash-{final.name}-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_path(root)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole, wrapper-free model on rank 0's CPU (other ranks get {}): for final/model.safetensors.

    Gathered one parameter at a time and offloaded to the CPU as it comes, so the GPU never holds it whole.
    """
    state_dict = _dcp().state_dict
    return state_dict.get_model_state_dict(model, options=state_dict.StateDictOptions(full_state_dict=True,
                                                                                      cpu_offload=True))


# ---------------------------------------------------------------------------------------------- reading


def load_sharded(path: Path, *, model: torch.nn.Module, optimizer: Any, scheduler: Any = None, scaler: Any = None,
                 rank: int = 0, verify: bool = True
                 ) -> tuple[TrainerState, dict | None, dict | None, dict | None]:
    """Load a sharded checkpoint into the prepared model (FSDP or plain) and its optimizer.

    Every rank calls this; DCP reads the slices each rank needs, whatever world size wrote them. Returns the
    trainer state, this rank's RNG state, its statistics and its loader position (None without one).
    """
    if verify:  # False: rank 0 checked the manifest already (launcher.loop.resume)
        validate(path)
    optimizer = _torch_optimizer(optimizer)
    dcp = _dcp()
    shards = {"model": dcp.state_dict.get_model_state_dict(model),
              "optimizer": dcp.state_dict.get_optimizer_state_dict(model, optimizer)}
    dcp.load(shards, checkpoint_id=path / DCP_DIR)
    dcp.state_dict.set_model_state_dict(model, shards["model"])
    dcp.state_dict.set_optimizer_state_dict(model, optimizer, shards["optimizer"])
    if scheduler is not None and (path / "scheduler.pt").exists():
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if scaler is not None and (path / "scaler.pt").exists():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    state, stats = trainer_state_of(path, rank)
    own = read_rank_file(path, rank)
    # own sums: the same world size resumes bit-identical
    return state, own.rng, (own.stats if own.kept else stats), own.loader


def check_resume_format(path: Path, *, sharded_run: bool) -> None:
    """One clear line when a checkpoint's format cannot continue in this run (DDP checkpoint under FSDP)."""
    if sharded_run and not is_sharded_checkpoint(path):
        raise UsageError(f"--resume {path}: a DDP/single-process checkpoint (model.safetensors) cannot continue "
                         f"an FSDP run; resume it with the config that wrote it, or export its weights and "
                         f"start a new FSDP run from them")


def model_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The whole model of a sharded checkpoint, in this one process, without a process group or a model.

    The tensors' shapes and dtypes come from DCP's metadata; DCP then fills them from every rank's shards.
    """
    dcp = _dcp()
    reader = dcp.FileSystemReader(str(Path(path) / DCP_DIR))
    metadata = reader.read_metadata()
    weights: dict[str, torch.Tensor] = {}
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith(MODEL_PREFIX) and hasattr(meta, "size"):
            weights[key[len(MODEL_PREFIX):]] = torch.empty(meta.size, dtype=meta.properties.dtype)
    if not weights:
        raise CheckpointError(f"{path} holds no model tensors")
    loaded = {"model": weights}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(loaded, storage_reader=reader, no_dist=True)
    return loaded["model"]


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a checkpoint's weights, sharded or not, strictly into a plain (unprepared) model."""
    path = Path(path)
    if not (path.is_dir() and is_sharded_checkpoint(path)):
        load_model_weights(model, path)
        return
    validate(path)
    weights = model_weights(path)
    expected = model.state_dict()
    if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in expected):
        raise UsageError(f"weights in {path} do not fit this model; build the model with the config the "
                         f"checkpoint was trained with")
    model.load_state_dict(weights, strict=True)


def export_weights(checkpoint: str | os.PathLike, out: str | os.PathLike) -> int:
    """Write one plain safetensors file from any checkpoint folder (sharded or not). Returns the tensor count."""
    checkpoint, out = Path(checkpoint), Path(out)
    try:
        validate(checkpoint)
    except CheckpointError as err:
        raise UsageError(f"{checkpoint} is not a valid checkpoint ({err})") from None
    if is_sharded_checkpoint(checkpoint):
        weights = model_weights(checkpoint)
    else:
        from safetensors.torch import load_file

        weights = load_file(str(checkpoint / "model.safetensors"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    save_weights(weights, tmp)
    os.replace(tmp, out)
    return len(weights)
