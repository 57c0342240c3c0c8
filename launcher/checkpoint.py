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
`checkpoints/.tmp-step-.../`, fsyncs, renames it into place and fsyncs the folder; then all ranks wait.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from launcher.errors import UsageError

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
FORMAT_VERSION = 1
# Test-only fault injection: kill this process halfway through writing the checkpoint of this step.
FAULT_ENV = "LAUNCHER_TEST_KILL_DURING_SAVE_AT_STEP"


class CheckpointError(Exception):
    """A folder that is not a complete, loadable checkpoint."""


@dataclass
class TrainerState:
    """Where training stands; everything here is plain data saved as JSON."""

    epoch: int = 0  # index of the epoch in progress (the next one once `batches_done` is 0)
    batches_done: int = 0  # micro-batches of `epoch` already trained (per process)
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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


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

    @property
    def root(self) -> Path:
        return checkpoints_dir(self.output_dir)

    def save(self, state: TrainerState, *, model_state: dict[str, torch.Tensor], optimizer: Any,
             scheduler: Any = None, scaler: Any = None) -> Path:
        """Write one complete checkpoint. Every rank calls this; returns the final folder."""
        rng_states = _gather_to_all(capture_rng())
        train_stats = _gather_to_all(state.train_stats)
        name = checkpoint_name(state.global_step)
        final = self.root / name
        if self.is_main:
            self._write(final, state, train_stats, rng_states, model_state, optimizer, scheduler, scaler)
        _barrier()  # nobody goes on (or exits) before the checkpoint is complete on disk
        return final

    def _write(self, final: Path, state: TrainerState, train_stats: list, rng_states: list,
               model_state: dict, optimizer: Any, scheduler: Any, scaler: Any) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{final.name}-{os.getpid()}"
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
                    "batches_done": state.batches_done, "reason": state.reason,
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
        if output_dir.exists() and any(output_dir.iterdir()):
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


def load_model_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load `model.safetensors` (from a checkpoint folder or a file) strictly, with a clear mismatch error."""
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    try:
        weights = load_file(str(file))
    except FileNotFoundError:
        raise UsageError(f"no weights at {file}") from None
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read {file}: {err}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
        if wrong_shape:
            parts.append("shape mismatch: " + ", ".join(
                f"{k} {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}" for k in wrong_shape[:8]))
        raise UsageError(f"weights in {file} do not fit this model ({'; '.join(parts)}); "
                         f"build the model with the config the checkpoint was trained with")
    model.load_state_dict(weights, strict=True)


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: Any, scheduler: Any = None,
                    scaler: Any = None, rank: int = 0) -> tuple[TrainerState, dict | None, dict | None]:
    """Load everything into the given (unwrapped) model, optimizer, scheduler and scaler.

    Returns the trainer state, this rank's RNG state and this rank's partial-epoch statistics; the caller
    restores the RNG at the right moment (see launcher.loop).
    """
    validate(path)
    load_model_weights(model, path)
    device = next(model.parameters()).device
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    if scheduler is not None and (path / "scheduler.pt").exists():
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if scaler is not None and (path / "scaler.pt").exists():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    raw = read_trainer_state(path)
    rank_stats = raw.pop("train_stats") or []
    known = set(TrainerState.__dataclass_fields__)
    state = TrainerState(**{k: v for k, v in raw.items() if k in known})
    ranks = torch.load(path / "rng.pt", weights_only=True)["ranks"]
    rng = ranks[rank] if rank < len(ranks) else None
    stats = rank_stats[rank] if rank < len(rank_stats) else None
    return state, rng, stats
