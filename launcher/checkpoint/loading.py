"""Loading, all or nothing: `read_checkpoint` checks every file against the model, optimizer, scheduler and scaler
before `apply_checkpoint` changes any of them; `load_model_weights` for the weights alone."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from launcher.checkpoint.layout import (
    TRAINER_STATE,
    CheckpointError,
    CheckpointMismatch,
    TrainerState,
    plain_state_dict,
    validate,
)
from launcher.checkpoint.rank_state import read_rank_file, read_stats
from launcher.errors import UsageError


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
        raise CheckpointError(f"cannot read {file}: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:300]


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
    try:
        weights = read_weights(path)
        check_weights(model, weights)
    except CheckpointError as err:
        raise UsageError(f"{path}: {err}") from None
    model.load_state_dict(weights, strict=True)


def check_optimizer_state(optimizer: Any, saved: dict) -> None:
    """The saved optimizer state fits `optimizer`: same groups, same number of parameters in each, and every
    per-parameter tensor (momenta, second moments) shaped like its parameter."""
    try:
        _check_optimizer_state(optimizer, saved)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as err:
        raise CheckpointMismatch(f"optimizer.pt does not hold an optimizer state ({type(err).__name__}: "
                                 f"{_first_line(err)})") from None


def _check_optimizer_state(optimizer: Any, saved: Any) -> None:
    if not isinstance(saved, dict):
        raise TypeError(f"it holds a {type(saved).__name__}")
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
    loader: dict | None = None  # this rank's loader position (a stream's state_dict), from its own file


def _torch_load(path: Path, **kw: Any) -> Any:
    try:
        return torch.load(path, weights_only=True, **kw)
    except Exception as err:  # a file that validates (checksum) but does not unpickle: written by other code
        raise CheckpointMismatch(f"cannot load {path.name}: {_first_line(err)}") from None


def check_fits(path: Path, *, model: torch.nn.Module, optimizer: Any, scheduler: Any = None,
               scaler: Any = None) -> None:
    """Whether the checkpoint's files load and its weights and optimizer state fit `model` and `optimizer`,
    from the safetensors header and a memory-mapped optimizer.pt (names and shapes only, no tensor data read),
    and every small file (scheduler, scaler, trainer state, every rank's RNG file) loaded. Raises
    CheckpointError (CheckpointMismatch: valid, but does not fit), for whatever damage a file has."""
    path = Path(path)
    file = path / "model.safetensors"
    try:
        with safe_open(str(file), framework="pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read {file}: {_first_line(err)}") from None
    try:
        check_weights(model, plain_state_dict({k: torch.empty(s, device="meta") for k, s in shapes.items()}))
        check_optimizer_state(optimizer, _torch_load(path / "optimizer.pt", mmap=True, map_location="cpu"))
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - any other failure to read a file: this checkpoint does not load
        raise CheckpointError(f"{path.name} does not load ({type(err).__name__}: {_first_line(err)})") from None
    check_small_files(path, scheduler=scheduler, scaler=scaler)


def check_small_files(path: Path, *, scheduler: Any = None, scaler: Any = None) -> None:
    """The checkpoint's small files load: scheduler.pt and scaler.pt (with the same keys as `scheduler` and
    `scaler`, when given), trainer_state.json, and every rank's RNG file. Raises CheckpointError. For a sharded
    checkpoint this is what --resume auto checks beyond the manifest (its shards are checked by DCP as it loads)."""
    path = Path(path)
    try:
        for name, current in (("scheduler.pt", scheduler), ("scaler.pt", scaler)):
            if (path / name).exists():
                saved = _torch_load(path / name)
                if current is not None:
                    _check_same_keys(name, current.state_dict(), saved)
        state, _ = trainer_state_of(path, 0)
        for rank in range(max(state.world_size, 1)):
            _read_own(path, rank)
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - any other failure to read a file: this checkpoint does not load
        raise CheckpointError(f"{path.name} does not load ({type(err).__name__}: {_first_line(err)})") from None


def _read_own(path: Path, rank: int) -> Any:
    try:
        return read_rank_file(path, rank, load=_torch_load)  # this rank's file only
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise CheckpointMismatch(f"{path.name}'s RNG file of rank {rank} does not hold RNG states "
                                 f"({_first_line(err)})") from None


def read_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: Any, scheduler: Any = None,
                    scaler: Any = None, rank: int = 0, verify: bool = True) -> LoadedCheckpoint:
    """Read and check every file of the checkpoint against the (unwrapped) model, optimizer, scheduler and
    scaler, changing none of them. Raises CheckpointError (CheckpointMismatch: valid, but does not fit).
    `verify=False`: the manifest check (sizes, sha256) was done already (on rank 0, see loop.resume)."""
    try:
        return _read_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                rank=rank, verify=verify)
    except (CheckpointError, UsageError):
        raise
    except Exception as err:  # noqa: BLE001 - whatever a damaged file raises: one line, the caller's verdict
        raise CheckpointError(f"{path.name} does not load ({type(err).__name__}: {_first_line(err)})") from None


def _read_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: Any, scheduler: Any, scaler: Any, rank: int,
                     verify: bool) -> LoadedCheckpoint:
    if verify:
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
    state, stats = trainer_state_of(path, rank)
    own = _read_own(path, rank)
    if own.kept:  # this rank's own sums, as it had them: the same world size resumes bit-identical
        stats = own.stats
    return LoadedCheckpoint(path=path, weights=weights, optimizer=optim_state, scheduler=sched_state,
                            scaler=scaler_state, state=state, rng=own.rng, stats=stats, loader=own.loader)


def trainer_state_of(path: Path, rank: int) -> tuple[TrainerState, dict | None]:
    """The checkpoint's TrainerState and this rank's share of its partial-epoch statistics."""
    try:
        raw = read_trainer_state(path)
        stats = read_stats(raw, rank)
        known = set(TrainerState.__dataclass_fields__) - {"train_stats"}
        return TrainerState(**{k: v for k, v in raw.items() if k in known}), stats
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as err:
        raise CheckpointMismatch(f"{TRAINER_STATE} does not hold a trainer state ({err})") from None


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
