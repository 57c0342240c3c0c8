"""Sharded checkpoints for FSDP runs: every rank writes its own shards with torch.distributed.checkpoint (DCP).

Layout of one sharded checkpoint, `<output_dir>/checkpoints/step-00000420/`:

    dcp/.metadata        DCP's index of every tensor shard (written by rank 0 once all ranks wrote theirs)
    dcp/__R_0.distcp     rank R's shards of the model ("model.*") and of the optimizer state ("optimizer.*")
    scheduler.pt, scaler.pt, trainer_state.json   as in launcher.checkpoint (rank 0, small)
    rng.pt, rng-00001.pt, ...   each rank's RNG states, written by that rank (launcher.checkpoint.rank_state)
    manifest.json        written last: every file with its size and sha256 ("sharded": true, the writing
                         world size)

Nothing is gathered whole: each rank serializes only its local shards, in parallel. The folder is written
under `checkpoints/.tmp-step-...-sharded/` (one name for all ranks), the ranks report success to each other
(an all-gathered flag), and only then rank 0 writes the manifest and renames the folder into place, the same
commit launcher.checkpoint uses. A kill at any moment leaves either no folder under the final name or a
complete one, so the previous checkpoint stays the newest valid one.

The manifest records every file's size and sha256. Each rank hashes the files it wrote itself (its shards,
read back from the page cache right after DCP wrote them, and its RNG file), in parallel with the other
ranks, and sends rank 0 the digests (one gather of a few names and digests per rank, as DCP's own save
gathers every rank's write results); rank 0 hashes its own and the small files. A resume hashes every file
once, on rank 0 (launcher.checkpoint.layout.validate, with a few threads), and checks that every shard DCP's
metadata points into lies inside its file.

DCP reshards on load: a checkpoint written by N processes loads on M, into FSDP-sharded or plain (DDP,
single-process) models alike; `export_weights` turns one into a single safetensors file in one process.
"""

from __future__ import annotations

import contextlib
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
    CheckpointMismatch,
    TrainerState,
    _fsync_path,
    _sha256,
    capture_rng,
    checkpoint_name,
    load_model_weights,
    save_weights,
    validate,
)
from launcher.checkpoint.collective import first_error
from launcher.checkpoint.layout import DCP_DIR  # validation reads the shards' folder too
from launcher.checkpoint.loading import _torch_load, read_weights, trainer_state_of
from launcher.checkpoint.rank_state import (
    STATS_REDUCED,
    read_rank_file,
    reduce_with_flags,
    rng_file,
    write_rank_rng,
)
from launcher.errors import LeaseLost, RunStopped, UsageError, WriteFailed
from launcher.faults.write_failures import agree, cause_of, mount_point, write_failed

MODEL_PREFIX = "model."
CALLBACKS_KEY = "callbacks"  # fit's callbacks' tensors in the DCP state dict: "callbacks.NAME/KEY"


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
                 failure: RunStopped | None = None, loader_state: dict | None = None,
                 extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
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
        if extra_tensors:
            shards[CALLBACKS_KEY] = dict(extra_tensors)
        dcp.save(shards, checkpoint_id=tmp / DCP_DIR)  # FileSystemWriter fsyncs every file it writes
        # each rank its own file (RNG, its own sums, its loader's position); committed after the next agree
        write_rank_rng(tmp, _rank(), capture_rng(), state.train_stats, loader_state)
        if os.environ.get(FAULT_ENV) == str(state.global_step) and _rank() == _world() - 1:
            os.kill(os.getpid(), signal.SIGKILL)  # test-only: one rank dies with its shards written
        if manager.is_main:
            _write_small_files(tmp, state, train_stats, scheduler, scaler)
        mine = _own_digests(tmp)
    except BaseException as err:  # noqa: B036 - DCP's CheckpointException derives from BaseException
        if not isinstance(err, (Exception, _dcp().api.CheckpointException)):
            raise  # KeyboardInterrupt, SystemExit: not a write failure
        failure = write_failed(err, manager.root, f"checkpoint {name}")
    agree(_discarded(failure, tmp, manager.is_main))  # every rank's shards are on disk before any commit
    digests = _gather_digests(mine)
    if manager.is_main:
        try:
            _commit(tmp, final, state, digests, owner=getattr(manager.lease, "run_id", None))
            if best:
                manager.mark_best(final.name)
        except (OSError, CheckpointError) as err:
            failure = write_failed(err, manager.root, f"checkpoint {name}")
    agree(_discarded(failure, tmp, manager.is_main))  # nobody goes on before the checkpoint is committed
    return final


def _own_digests(tmp: Path) -> dict[str, tuple[int, str]]:
    """{name: (size, sha256)} of the files this rank wrote: its DCP shards and its RNG file."""
    rank = _rank()
    mine = sorted((tmp / DCP_DIR).glob(f"__{rank}_*")) + [tmp / rng_file(rank)]
    return {p.relative_to(tmp).as_posix(): (p.stat().st_size, _sha256(p)) for p in mine}


def _gather_digests(mine: dict[str, tuple[int, str]]) -> dict[str, tuple[int, str]]:
    """Collective: every rank's digests, on rank 0 ({} elsewhere). One gather; no rank receives another's."""
    if _world() == 1:
        return mine
    gathered: list | None = [None] * _world() if _rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    return {name: value for part in (gathered or []) for name, value in part.items()}


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


def _commit(tmp: Path, final: Path, state: TrainerState, digests: dict[str, tuple[int, str]],
            owner: str | None = None) -> None:
    """Manifest last, then one rename: the folder under its final name is complete or absent.

    `digests`: (size, sha256) of the files each rank hashed as it wrote them; rank 0 hashes the others."""
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        rel = path.relative_to(tmp).as_posix()
        size = path.stat().st_size
        if rel in digests:
            if digests[rel][0] != size:
                raise CheckpointError(f"{rel} has {size} bytes, its writer hashed {digests[rel][0]}")
            files[rel] = {"size": size, "sha256": digests[rel][1]}
        else:
            files[rel] = {"size": size, "sha256": _sha256(path)}
    manifest = {"format": FORMAT_VERSION, "step": state.global_step, "epoch": state.epoch,
                "batches_done": state.batches_done, "samples_done": state.samples_done, "reason": state.reason,
                "owner": owner, "sharded": True, "world_size": _world(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
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
    Collective, all or nothing as far as a failure can be known in advance: every rank reads its small files
    first, and only when all could does DCP load; any failure is one UsageError, on every rank together.
    """
    if verify:  # False: rank 0 checked the manifest already (launcher.loop.resume)
        try:
            validate(path)
        except CheckpointError as err:
            raise UsageError(f"cannot resume from {path}: {err}") from None
    optimizer = _torch_optimizer(optimizer)
    error, small = None, None
    try:
        small = _read_small_files(path, rank, scheduler is not None, scaler is not None)
    except Exception as err:  # noqa: BLE001 - whatever a damaged file raises: one line, every rank together
        error = _one_line(err)
    error = first_error(error)
    if error is not None:
        raise UsageError(f"cannot resume from {path}: {error}")
    dcp = _dcp()
    try:
        shards = {"model": dcp.state_dict.get_model_state_dict(model),
                  "optimizer": dcp.state_dict.get_optimizer_state_dict(model, optimizer)}
        dcp.load(shards, checkpoint_id=path / DCP_DIR)
    except BaseException as err:  # noqa: B036 - DCP's CheckpointException derives from BaseException
        if not isinstance(err, (Exception, dcp.api.CheckpointException)):
            raise
        error = f"cannot load its shards ({_one_line(err)})"
    error = first_error(error)  # DCP raises on every rank together; this makes sure of it
    if error is not None:
        raise UsageError(f"cannot resume from {path}: {error}")
    dcp.state_dict.set_model_state_dict(model, shards["model"])
    dcp.state_dict.set_optimizer_state_dict(model, optimizer, shards["optimizer"])
    sched_state, scaler_state, state, stats, own = small
    if sched_state is not None:
        scheduler.load_state_dict(sched_state)
    if scaler_state is not None:
        scaler.load_state_dict(scaler_state)
    # own sums: the same world size resumes bit-identical
    return state, own.rng, (own.stats if own.kept else stats), own.loader


def load_callback_tensors(path: Path, templates: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Collective: the callbacks' tensors of a sharded checkpoint, DCP loading into `templates` (NAME/KEY ->
    a tensor or DTensor of the expected shape, filled in place; whatever world size wrote them). Only the keys
    the checkpoint holds are loaded and returned. Any failure: one UsageError, on every rank together."""
    dcp = _dcp()
    error, wanted = None, {}
    try:
        metadata = dcp.FileSystemReader(str(Path(path) / DCP_DIR)).read_metadata()
        saved = {k[len(CALLBACKS_KEY) + 1:] for k in metadata.state_dict_metadata
                 if k.startswith(CALLBACKS_KEY + ".")}
        wanted = {k: v for k, v in templates.items() if k in saved}
        if wanted:
            dcp.load({CALLBACKS_KEY: wanted}, checkpoint_id=Path(path) / DCP_DIR)
    except BaseException as err:  # noqa: B036 - DCP's CheckpointException derives from BaseException
        if not isinstance(err, (Exception, dcp.api.CheckpointException)):
            raise
        error = f"cannot load the callbacks' shards ({_one_line(err)})"
    error = first_error(error)
    if error is not None:
        raise UsageError(f"cannot resume from {path}: {error}")
    return wanted


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def _read_small_files(path: Path, rank: int, scheduler: bool, scaler: bool) -> tuple:
    """(scheduler state, scaler state, trainer state, its statistics, this rank's own file); CheckpointError."""
    sched_state = _torch_load(path / "scheduler.pt") if scheduler and (path / "scheduler.pt").exists() else None
    scaler_state = _torch_load(path / "scaler.pt") if scaler and (path / "scaler.pt").exists() else None
    state, stats = trainer_state_of(path, rank)
    try:
        own = read_rank_file(path, rank, load=_torch_load)
    except (KeyError, TypeError, AttributeError) as err:
        raise CheckpointMismatch(f"{path.name}'s RNG file of rank {rank} does not hold RNG states ({err})") from None
    return sched_state, scaler_state, state, stats, own


def check_resume_format(path: Path, *, sharded_run: bool) -> None:
    """One clear line when a checkpoint's format cannot continue in this run (DDP checkpoint under FSDP)."""
    if sharded_run and not is_sharded_checkpoint(path):
        raise UsageError(f"--resume {path}: a DDP/single-process checkpoint (model.safetensors) cannot continue "
                         f"an FSDP run; resume it with the config that wrote it, or export its weights and "
                         f"start a new FSDP run from them")


def model_weights(path: str | os.PathLike, group: str | None = None) -> dict[str, torch.Tensor]:
    """The whole model of a sharded checkpoint, in this one process, without a process group or a model
    (`group=CALLBACKS_KEY`: the callbacks' tensors instead, by NAME/KEY, e.g. "ema/fc.weight").

    The tensors' shapes and dtypes come from DCP's metadata; DCP then fills them from every rank's shards.
    """
    dcp = _dcp()
    reader = dcp.FileSystemReader(str(Path(path) / DCP_DIR))
    try:
        metadata = reader.read_metadata()
    except Exception as err:  # noqa: BLE001 - an unpickling error of any type
        raise CheckpointError(f"{path}/{DCP_DIR}/.metadata is not valid DCP metadata: {_one_line(err)}") from None
    group = group or MODEL_PREFIX[:-1]
    weights: dict[str, torch.Tensor] = {}
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith(group + ".") and hasattr(meta, "size"):
            weights[key[len(group) + 1:]] = torch.empty(meta.size, dtype=meta.properties.dtype)
    if not weights:
        raise CheckpointError(f"{path} holds no {'model' if group == MODEL_PREFIX[:-1] else group} tensors")
    loaded = {group: weights}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(loaded, storage_reader=reader, no_dist=True)
    except BaseException as err:  # noqa: B036 - DCP's CheckpointException derives from BaseException
        if not isinstance(err, (Exception, dcp.api.CheckpointException)):
            raise
        raise CheckpointError(f"cannot load the shards of {path}: {_one_line(err)}") from None
    return loaded[group]


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a checkpoint's weights, sharded or not, strictly into a plain (unprepared) model."""
    path = Path(path)
    if not (path.is_dir() and is_sharded_checkpoint(path)):
        load_model_weights(model, path)
        return
    try:
        validate(path)
        weights = model_weights(path)
    except CheckpointError as err:
        raise UsageError(f"{path} is not a valid checkpoint ({err})") from None
    expected = model.state_dict()
    if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in expected):
        raise UsageError(f"weights in {path} do not fit this model; build the model with the config the "
                         f"checkpoint was trained with")
    model.load_state_dict(weights, strict=True)


def export_weights(checkpoint: str | os.PathLike, out: str | os.PathLike) -> int:
    """Write one plain safetensors file from any checkpoint folder (sharded or not). Returns the tensor count.

    A checkpoint that does not validate or load: UsageError. A write that fails (a full disk): WriteFailed,
    and nothing is left at `out` but what was there before (the file is written aside, fsynced, renamed)."""
    checkpoint, out = Path(checkpoint), Path(out)
    try:
        validate(checkpoint)
        if is_sharded_checkpoint(checkpoint):
            weights = model_weights(checkpoint)
        else:
            weights = read_weights(checkpoint)
    except CheckpointError as err:
        raise UsageError(f"{checkpoint} is not a valid checkpoint ({err})") from None
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_weights(weights, tmp)
        _fsync_path(tmp)
        os.replace(tmp, out)
        _fsync_path(out.parent)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type on a full disk
        cause = cause_of(err, out.parent)
        raise WriteFailed(f"cannot write {out}: {cause} (filesystem {mount_point(out.parent)}); nothing was "
                          f"left there: free space or give another output path") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return len(weights)
