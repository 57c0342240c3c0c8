"""Checkpoints that lose nothing: complete state, written atomically by rank 0, validated on load.

Layout of one checkpoint, `<output_dir>/checkpoints/step-00000420/`:

    model.safetensors   weights (unwrapped model, safetensors: nothing is unpickled on load)
    optimizer.pt        optimizer state_dict     } torch.save of plain tensors/numbers,
    scheduler.pt        LR scheduler state_dict  } loaded with weights_only=True
    scaler.pt           fp16 grad scaler (only with fp16)
    rng.pt              python/numpy/torch/CUDA RNG states of every rank
    trainer_state.json  epoch, position inside the epoch, global step, history, best/early-stopping
                        state, the resolved config and `extra` (e.g. the W&B run id)
    manifest.json       written last: file sizes and sha256, step. No manifest, no checkpoint.

Every rank takes part in `save` (the RNG states are gathered to rank 0), only rank 0 writes, into
`checkpoints/.tmp-step-.../`, fsyncs, renames it into place and fsyncs the folder; then all ranks learn
together whether it worked (launcher.write_failures.agree). A failed write removes its temp folder and
raises WriteFailed on every rank; the earlier checkpoints and `best` are untouched.

Weights are stored under the plain model's names (`plain_state_dict`): no `_orig_mod.` from torch.compile,
no `module.` from DDP, so any checkpoint loads into the recipe's model, compiled or not.

Loading is all or nothing: `read_checkpoint` checks every file against the model, optimizer, scheduler
and scaler before `apply_checkpoint` changes any of them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from launcher.errors import LeaseLost, RunStopped, UsageError
from launcher.write_failures import agree, write_failed

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
FORMAT_VERSION = 1
LEASE_PREFIX = ".launcher-lease"  # launcher.lease's files: the run's claim on its folder, not its output
# Test-only fault injection: kill this process halfway through writing the checkpoint of this step.
FAULT_ENV = "LAUNCHER_TEST_KILL_DURING_SAVE_AT_STEP"
# Test-only: the ranks listed here (comma-separated RANK values) see no checkpoint in an output folder, as a
# node with a stale view of a shared file system might (NFS attribute caching after a requeue).
STALE_VIEW_ENV = "LAUNCHER_TEST_STALE_VIEW_RANKS"


class CheckpointError(Exception):
    """A folder that is not a complete, loadable checkpoint."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint that validates but does not fit this model, optimizer or scheduler."""


COMPILE_PREFIX = "_orig_mod."  # what torch.compile's OptimizedModule puts before every key of its module


def plain_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as the plain model names them: torch.compile's `_orig_mod.` removed wherever it occurs.

    Accelerate's get_state_dict unwraps DDP (`module.`) but keeps a compiled module, and a model compiled
    before `prepare` (or a compiled submodule) keeps the prefix even with keep_torch_compile=False.
    """
    return {k.replace(COMPILE_PREFIX, ""): v for k, v in state_dict.items()}


@dataclass
class TrainerState:
    """Where training stands; everything here is plain data saved as JSON."""

    epoch: int = 0  # index of the epoch in progress (the next one once `batches_done` is 0)
    batches_done: int = 0  # micro-batches of `epoch` already trained (per process)
    # Samples of `epoch` consumed by all ranks together at the last optimizer step: the position a resume
    # continues from, at any world size (launcher.data.sampling). 0 in checkpoints from before it existed.
    samples_done: int = 0
    global_step: int = 0  # optimizer steps taken
    history: list[dict] = field(default_factory=list)  # one metrics row per completed epoch
    best_value: float | None = None
    best_epoch: int | None = None
    best_checkpoint: str | None = None
    bad_epochs: int = 0  # epochs since the monitored metric last improved (early stopping)
    train_stats: dict | None = None  # partial-epoch training statistics of this process
    epoch_seconds: float = 0.0  # time already spent in `epoch` before the checkpoint
    train_seconds: float = 0.0
    world_size: int = 1
    reason: str = ""
    finished: str = ""  # "completed" or "early-stopped" in the checkpoint that ends the run
    config: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINTS


# ---------------------------------------------------------------------------------------------- writing


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON next to `path`, fsync, rename over it: readers see the old file or the new one."""
    write_text_atomic(path, json.dumps(data, indent=1))


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after a failed write: no stray temp file (after os.replace: gone already)
    _fsync_path(path.parent)


def append_line_durable(path: Path, line: str) -> None:
    """Append one line with a single write and fsync; on any failure cut the file back to where it was,
    so it never ends in a partial line."""
    data = line.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    size = os.fstat(fd).st_size
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")
        os.fsync(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise
    finally:
        os.close(fd)


def save_weights(state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Weights as safetensors on the CPU: what checkpoints and final/ hold, loadable without unpickling."""
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(path),
              metadata={"format": "pt"})


def capture_rng() -> dict:
    """This process's RNG states as tensors and numbers (loadable with weights_only=True)."""
    version, mt_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npk = state["numpy"]
    np.random.set_state((npk["kind"], npk["keys"].numpy().astype(np.uint32), npk["pos"], npk["has_gauss"],
                         npk["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_to_all(obj: Any) -> list[Any]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


@dataclass
class CheckpointManager:
    """Saves, rotates and tracks the best checkpoint. Call `save` on every rank."""

    output_dir: Path
    keep_last: int = 3
    is_main: bool = True
    lease: Any = None  # launcher.lease.OutputLease on rank 0: checked before every write, its run id recorded

    @property
    def root(self) -> Path:
        return checkpoints_dir(self.output_dir)

    def save(self, state: TrainerState, *, model_state: dict[str, torch.Tensor], optimizer: Any,
             scheduler: Any = None, scaler: Any = None, best: bool = False,
             failure: RunStopped | None = None) -> Path:
        """Write one complete checkpoint (and point `best` at it). Every rank calls this; returns the folder.

        `failure`: an earlier write of this rank that failed (e.g. the metrics line); it is reported with
        this save's outcome instead of writing. Raises WriteFailed or LeaseLost on every rank together.
        """
        rng_states = _gather_to_all(capture_rng())
        train_stats = _gather_to_all(state.train_stats)
        name = checkpoint_name(state.global_step)
        final = self.root / name
        if self.is_main and failure is None:
            failure = self._guarded_write(final, state, train_stats, rng_states, plain_state_dict(model_state),
                                          optimizer, scheduler, scaler, best)
        agree(failure)  # nobody goes on (or exits) before the checkpoint is complete on disk, or all stop
        return final

    def _tmp(self, final: Path) -> Path:
        return self.root / f".tmp-{final.name}-{os.getpid()}"

    def _guarded_write(self, final: Path, state: TrainerState, train_stats: list, rng_states: list,
                       model_state: dict, optimizer: Any, scheduler: Any, scaler: Any,
                       best: bool) -> RunStopped | None:
        try:
            if self.lease is not None:
                self.lease.check()  # a stale writer never overwrites what the folder's new owner wrote
            self._write(final, state, train_stats, rng_states, model_state, optimizer, scheduler, scaler)
            if best:
                self.mark_best(final.name)
        except LeaseLost as err:
            return err
        except Exception as err:  # noqa: BLE001 - torch.save and safetensors raise non-OSError types
            failure = write_failed(err, self.root, f"checkpoint {final.name}")
            self._discard(final)
            return failure
        return None

    def _discard(self, final: Path) -> None:
        """After a failed write: no temp folder left that could pass for a checkpoint, the previous one back."""
        shutil.rmtree(self._tmp(final), ignore_errors=True)
        trash = self.root / f".trash-{final.name}-{os.getpid()}"
        if trash.is_dir() and not final.exists():
            with contextlib.suppress(OSError):
                os.replace(trash, final)

    def _write(self, final: Path, state: TrainerState, train_stats: list, rng_states: list,
               model_state: dict, optimizer: Any, scheduler: Any, scaler: Any) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp(final)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        fault = os.environ.get(FAULT_ENV) == str(state.global_step)
        payload = asdict(state)
        payload["train_stats"] = train_stats  # one entry per rank
        files = {
            "model.safetensors": lambda p: save_weights(model_state, p),
            "optimizer.pt": lambda p: torch.save(optimizer.state_dict(), p),
            "rng.pt": lambda p: torch.save({"ranks": rng_states}, p),
            TRAINER_STATE: lambda p: Path(p).write_text(json.dumps(payload, indent=1)),
        }
        if scheduler is not None:
            files["scheduler.pt"] = lambda p: torch.save(scheduler.state_dict(), p)
        if scaler is not None:
            files["scaler.pt"] = lambda p: torch.save(scaler.state_dict(), p)
        manifest = {"format": FORMAT_VERSION, "step": state.global_step, "epoch": state.epoch,
                    "batches_done": state.batches_done,
                    "samples_done": state.samples_done, "reason": state.reason,
                    "owner": getattr(self.lease, "run_id", None),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": {}}
        for i, (fname, write) in enumerate(files.items()):
            path = tmp / fname
            write(str(path))
            _fsync_path(path)
            manifest["files"][fname] = {"size": path.stat().st_size, "sha256": _sha256(path)}
            if fault and i == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(tmp)
        # Signals cannot split this: the handlers only set a flag, and a SIGKILL between the two renames
        # leaves no folder under the final name, so the previous checkpoint is the newest valid one.
        if final.exists():  # the same step saved again (e.g. after a resume): replace it whole
            trash = self.root / f".trash-{final.name}-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_path(self.root)

    def mark_best(self, name: str) -> None:
        """Point `checkpoints/best` at the named checkpoint (an atomically replaced symlink)."""
        if not self.is_main:
            return
        link = self.root / "best"
        tmp = self.root / f".best-{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(name, tmp)
        os.replace(tmp, link)
        _fsync_path(self.root)

    def rotate(self, protect: str | None) -> None:
        """Keep the newest `keep_last` checkpoints plus `protect` (the best); drop stale temp folders."""
        if not self.is_main or not self.root.exists():
            return
        names = list_checkpoints(self.output_dir)
        for name in names[: max(len(names) - self.keep_last, 0)]:
            if name != protect:
                shutil.rmtree(self.root / name, ignore_errors=True)

    def clean_stale(self) -> None:
        """Remove temp folders left by a process killed mid-write (they never were checkpoints)."""
        if not self.is_main or not self.root.exists():
            return
        for path in self.root.iterdir():
            if path.name.startswith((".tmp-", ".trash-", ".best-")):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- reading


def list_checkpoints(output_dir: str | os.PathLike) -> list[str]:
    """Names of checkpoint folders, oldest first (the names sort by training progress)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.is_symlink() and p.name.startswith("step-"))


def validate(path: str | os.PathLike) -> dict:
    """Return the manifest of a complete checkpoint, or raise CheckpointError saying what is wrong."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {MANIFEST} (incomplete write?)") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}/{MANIFEST} is unreadable: {err}") from None
    if manifest.get("format") != FORMAT_VERSION or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path}/{MANIFEST} has an unknown format")
    for fname, meta in manifest["files"].items():
        file = path / fname
        if not file.is_file():
            raise CheckpointError(f"{path} is missing {fname}")
        if file.stat().st_size != meta["size"]:
            raise CheckpointError(f"{path}/{fname} has {file.stat().st_size} bytes, expected {meta['size']}")
        if "sha256" in meta and _sha256(file) != meta["sha256"]:  # sharded checkpoints: sizes only for shards
            raise CheckpointError(f"{path}/{fname} does not match its checksum (corrupted)")
    return manifest


def latest_valid(output_dir: str | os.PathLike, *, warn: bool = True) -> Path | None:
    """The newest checkpoint that validates; broken newer ones are skipped with a warning naming them."""
    if os.environ.get("RANK", "0") in os.environ.get(STALE_VIEW_ENV, "").split(","):
        return None
    for name in reversed(list_checkpoints(output_dir)):
        path = checkpoints_dir(output_dir) / name
        try:
            validate(path)
        except CheckpointError as err:
            if warn:
                warnings.warn(f"skipping checkpoint {path}: {err}", stacklevel=2)
            continue
        return path
    return None


def resolve_resume(resume: str, output_dir: str | os.PathLike) -> Path | None:
    """--resume auto|never|PATH -> the checkpoint folder to load, or None to start fresh."""
    output_dir = Path(output_dir)
    if resume == "auto":
        return latest_valid(output_dir)
    if resume == "never":
        if output_dir.exists() and any(not p.name.startswith(LEASE_PREFIX) for p in output_dir.iterdir()):
            raise UsageError(f"--resume never but {output_dir} is not empty; choose a new --output-dir, "
                             f"or use --resume auto to continue the run in it")
        return None
    path = Path(resume)
    if path.is_dir() and not (path / MANIFEST).exists() and (path / CHECKPOINTS).is_dir():
        found = latest_valid(path)  # a run folder was given: take its newest checkpoint
        if found is None:
            raise UsageError(f"--resume {resume}: that run folder has no valid checkpoint")
        return found
    if not path.is_dir():
        raise UsageError(f"--resume {resume}: no such checkpoint folder; give a checkpoints/step-* folder, "
                         f"a run folder, 'auto' or 'never'")
    try:
        validate(path)
    except CheckpointError as err:
        raise UsageError(f"--resume {resume}: not a valid checkpoint ({err})") from None
    return path


def read_trainer_state(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / TRAINER_STATE).read_text())


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """`model.safetensors` of a checkpoint folder (or a weights file) under the plain model's names."""
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    try:
        return plain_state_dict(load_file(str(file)))
    except FileNotFoundError:
        raise UsageError(f"no weights at {file}") from None
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read {file}: {err}") from None


def check_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Raise CheckpointMismatch naming the missing, unexpected and differently shaped tensors."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    parts = []
    if missing:
        parts.append(f"missing keys: {_names(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_names(unexpected)}")
    if wrong_shape:
        parts.append("shape mismatch: " + ", ".join(
            f"{k} {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}" for k in wrong_shape[:8]))
    if parts:
        raise CheckpointMismatch(f"weights do not fit this model ({'; '.join(parts)}); build the model with "
                                 f"the config the checkpoint was trained with")


def load_model_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load `model.safetensors` (from a checkpoint folder or a file) strictly, with a clear mismatch error."""
    weights = read_weights(path)
    try:
        check_weights(model, weights)
    except CheckpointMismatch as err:
        raise UsageError(f"{path}: {err}") from None
    model.load_state_dict(weights, strict=True)


def check_optimizer_state(optimizer: Any, saved: dict) -> None:
    """The saved optimizer state fits `optimizer`: same groups, same number of parameters in each, and every
    per-parameter tensor (momenta, second moments) shaped like its parameter."""
    groups, saved_groups = optimizer.param_groups, saved.get("param_groups")
    if not isinstance(saved_groups, list) or len(saved_groups) != len(groups):
        raise CheckpointMismatch(f"optimizer.pt has {len(saved_groups or [])} parameter groups, the optimizer "
                                 f"{len(groups)}")
    params = {}
    for i, (group, saved_group) in enumerate(zip(groups, saved_groups)):
        if len(group["params"]) != len(saved_group["params"]):
            raise CheckpointMismatch(f"optimizer.pt group {i} has {len(saved_group['params'])} parameters, the "
                                     f"optimizer {len(group['params'])}")
        params.update(zip(saved_group["params"], group["params"]))
    for pid, entry in saved.get("state", {}).items():
        if pid not in params:
            raise CheckpointMismatch(f"optimizer.pt has state for parameter {pid}, which no group holds")
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != params[pid].shape:
                raise CheckpointMismatch(f"optimizer.pt state {key!r} of parameter {pid} has shape "
                                         f"{tuple(value.shape)}, the parameter {tuple(params[pid].shape)}")


def _check_same_keys(name: str, current: dict, saved: Any) -> None:
    if not isinstance(saved, dict) or set(saved) != set(current):
        raise CheckpointMismatch(f"{name} does not match this run's {name.split('.')[0]} (keys "
                                 f"{_names(sorted(saved)) if isinstance(saved, dict) else type(saved).__name__} vs "
                                 f"{_names(sorted(current))})")


@dataclass
class LoadedCheckpoint:
    """Everything of one checkpoint, read and checked, nothing applied yet."""

    path: Path
    weights: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict | None
    scaler: dict | None
    state: TrainerState
    rng: dict | None  # this rank's
    stats: dict | None  # this rank's partial-epoch statistics


def _torch_load(path: Path, **kw: Any) -> Any:
    try:
        return torch.load(path, weights_only=True, **kw)
    except Exception as err:  # a file that validates (checksum) but does not unpickle: written by other code
        raise CheckpointMismatch(f"cannot load {path.name}: {str(err).splitlines()[0]}") from None


def read_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: Any, scheduler: Any = None,
                    scaler: Any = None, rank: int = 0) -> LoadedCheckpoint:
    """Read and check every file of the checkpoint against the (unwrapped) model, optimizer, scheduler and
    scaler, changing none of them. Raises CheckpointError (CheckpointMismatch: valid, but does not fit)."""
    validate(path)
    weights = read_weights(path)
    check_weights(model, weights)
    device = next(model.parameters()).device
    optim_state = _torch_load(path / "optimizer.pt", map_location=device)
    check_optimizer_state(optimizer, optim_state)
    sched_state = scaler_state = None
    if scheduler is not None and (path / "scheduler.pt").exists():
        sched_state = _torch_load(path / "scheduler.pt")
        _check_same_keys("scheduler.pt", scheduler.state_dict(), sched_state)
    if scaler is not None and (path / "scaler.pt").exists():
        scaler_state = _torch_load(path / "scaler.pt")
        _check_same_keys("scaler.pt", scaler.state_dict(), scaler_state)
    try:
        raw = read_trainer_state(path)
        rank_stats = raw.pop("train_stats") or []
        known = set(TrainerState.__dataclass_fields__)
        state = TrainerState(**{k: v for k, v in raw.items() if k in known})
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise CheckpointMismatch(f"{TRAINER_STATE} does not hold a trainer state ({err})") from None
    ranks = _torch_load(path / "rng.pt")["ranks"]
    return LoadedCheckpoint(path=path, weights=weights, optimizer=optim_state, scheduler=sched_state,
                            scaler=scaler_state, state=state, rng=ranks[rank] if rank < len(ranks) else None,
                            stats=rank_stats[rank] if rank < len(rank_stats) else None)


def apply_checkpoint(loaded: LoadedCheckpoint, *, model: torch.nn.Module, optimizer: Any, scheduler: Any = None,
                     scaler: Any = None) -> None:
    """Apply a checkpoint that `read_checkpoint` checked against these same objects."""
    model.load_state_dict(loaded.weights, strict=True)
    optimizer.load_state_dict(loaded.optimizer)
    if loaded.scheduler is not None:
        scheduler.load_state_dict(loaded.scheduler)
    if loaded.scaler is not None:
        scaler.load_state_dict(loaded.scaler)


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: Any, scheduler: Any = None,
                    scaler: Any = None, rank: int = 0) -> tuple[TrainerState, dict | None, dict | None]:
    """Load everything into the given (unwrapped) model, optimizer, scheduler and scaler, all or nothing.

    Returns the trainer state, this rank's RNG state and this rank's partial-epoch statistics; the caller
    restores the RNG at the right moment (see launcher.loop).
    """
    loaded = read_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, rank=rank)
    apply_checkpoint(loaded, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    return loaded.state, loaded.rng, loaded.stats


def first_error(error: str | None) -> str | None:
    """Collective: the lowest rank's error, so that every rank takes the same decision."""
    everyone = _gather_to_all(error)
    return next((e for e in everyone if e is not None), None)


UNLOADABLE_PREFIX = "unloadable-"


def loadable_checkpoint(path: Path | None, *, model: torch.nn.Module, optimizer: Any, fallback: bool,
                        output_dir: str | os.PathLike | None = None, is_main: bool = True) -> Path | None:
    """Collective: `path` if it loads into `model` and `optimizer`; with `fallback` (--resume auto) the
    newest older checkpoint that does, else a UsageError naming what does not match.

    A checkpoint skipped by the fallback is renamed `checkpoints/unloadable-step-...` (kept for the user,
    out of the resume order and of rotation), with one warning line saying what is wrong with it.
    """
    if path is None:
        return None
    candidates = [path]
    if fallback and output_dir is not None:
        candidates += [checkpoints_dir(output_dir) / n for n in reversed(list_checkpoints(output_dir))
                       if n < path.name]
    skipped = []
    for candidate in candidates:
        try:
            read_checkpoint(candidate, model=model, optimizer=optimizer)
            error = None
        except CheckpointError as err:
            error = str(err)
        error = first_error(error)
        if error is None:
            break
        if not fallback:
            raise UsageError(f"--resume {candidate}: {error}")
        if is_main:  # one line, from one rank
            print(f"warning: skipping checkpoint {candidate}: {error}", file=sys.stderr, flush=True)
        skipped.append(candidate)
    else:
        raise UsageError(f"no checkpoint in {checkpoints_dir(output_dir or path.parent.parent)} loads into this "
                         f"model (newest: {error}); resume with the code and config that wrote them, or "
                         f"train into a new --output-dir")
    if is_main:
        for bad in skipped:
            if bad.parent.name == CHECKPOINTS:
                with contextlib.suppress(OSError):
                    os.replace(bad, bad.with_name(UNLOADABLE_PREFIX + bad.name))
    _barrier()
    return candidate
