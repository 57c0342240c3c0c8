"""What a checkpoint is: its files' names, `TrainerState`, the errors, the step folders (`list_checkpoints`) and
the manifest check (`validate`: the manifest's schema, every file's size and sha256, and that each file parses)."""

from __future__ import annotations

import json
import os
import re
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from launcher.checkpoint.files import _sha256
from launcher.faults.lease import LEASE_PREFIX as LEASE_PREFIX  # the run's claim on its folder, not its output

CHECKPOINTS = "checkpoints"
DCP_DIR = "dcp"  # a sharded checkpoint's DCP folder (launcher.checkpoint.sharded)
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
FORMAT_VERSION = 1
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


def list_checkpoints(output_dir: str | os.PathLike) -> list[str]:
    """Names of checkpoint folders, oldest first (the names sort by training progress)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.is_symlink() and p.name.startswith("step-"))


# Checkpoints this process validated, with their manifest's identity at that moment: a resume hashes each
# file once (rank 0 chooses the checkpoint, then loads it) instead of once per step of the way.
_VALIDATED: dict[str, tuple] = {}


def _manifest_identity(path: Path) -> tuple | None:
    try:
        st = (path / MANIFEST).stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def validated_once(path: str | os.PathLike) -> None:
    """`validate`, unless this process already validated this checkpoint and its manifest is unchanged."""
    path = Path(path)
    key = str(path.resolve())
    identity = _manifest_identity(path)
    if identity is None or _VALIDATED.get(key) != identity:
        validate(path)


# The manifest's schema. Beside `format` and `files`, the keys the writers put there, each optional (older
# checkpoints lack some) but of its type when present; any other key, a missing or mistyped one, is an error.
MANIFEST_KEYS: dict[str, tuple] = {"step": (int,), "epoch": (int,), "batches_done": (int,), "samples_done": (int,),
                                   "reason": (str,), "owner": (str, type(None)), "created": (str,),
                                   "sharded": (bool,), "world_size": (int,)}
FILE_KEYS = ("sha256", "size")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# What every checkpoint holds, and a sharded one (its model and optimizer in DCP's folder) instead.
REQUIRED_FILES = ("model.safetensors", "optimizer.pt", TRAINER_STATE, "rng.pt")
REQUIRED_SHARDED = ("dcp/.metadata", TRAINER_STATE, "rng.pt")
SHARDED_DIR = "dcp"
# Left in a folder by NFS when a file is removed while open: never a checkpoint file.
_IGNORED_PREFIXES = (".nfs",)
_HASH_THREADS = 8  # hashlib releases the GIL: big files (a sharded checkpoint's shards) are hashed in parallel


def _is_type(value: Any, types: tuple) -> bool:
    # bool is an int to isinstance; a size or step of `true` is not a number
    return any(type(value) is t or (t is not int and t is not bool and isinstance(value, t)) for t in types)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_name(name: Any) -> str | None:
    """Why `name` cannot be a file of a checkpoint folder (None: it can)."""
    if not isinstance(name, str) or not name:
        return "is not a file name"
    if "\\" in name or "\x00" in name or name.startswith("/") or PurePosixPath(name).is_absolute():
        return "is not a relative path"
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "leaves the checkpoint folder or is not normalized"
    if name == MANIFEST:
        return "is the manifest itself"
    return None


def parse_manifest(text: str, where: str = MANIFEST) -> dict:
    """The manifest checked against its schema; CheckpointError (one line) for any deviation."""
    try:
        manifest = json.loads(text)
    except ValueError as err:
        raise CheckpointError(f"{where} is not JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{where} is not a JSON object")
    if manifest.get("format") != FORMAT_VERSION or type(manifest.get("format")) is not int:
        raise CheckpointError(f"{where} has an unknown format {_short(manifest.get('format'))}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{where} has no 'files' object")
    for key, value in manifest.items():
        if key in ("format", "files"):
            continue
        if key not in MANIFEST_KEYS:
            raise CheckpointError(f"{where} has an unknown key {_short(key)}")
        if not _is_type(value, MANIFEST_KEYS[key]):
            raise CheckpointError(f"{where}: {key} is {_short(value)}, not of type "
                                  f"{' or '.join(t.__name__ for t in MANIFEST_KEYS[key])}")
    for key in ("step", "epoch", "batches_done", "samples_done"):
        if manifest.get(key, 0) < 0:
            raise CheckpointError(f"{where}: {key} is negative")
    if "world_size" in manifest and manifest["world_size"] < 1:
        raise CheckpointError(f"{where}: world_size is {manifest['world_size']}")
    for name, meta in files.items():
        why = _check_name(name)
        if why is not None:
            raise CheckpointError(f"{where}: file {_short(name)} {why}")
        if not isinstance(meta, dict):
            raise CheckpointError(f"{where}: the entry of {name} is {_short(meta)}, not an object")
        if sorted(meta) != sorted(FILE_KEYS):
            missing, extra = sorted(set(FILE_KEYS) - set(meta)), sorted(set(meta) - set(FILE_KEYS))
            raise CheckpointError(f"{where}: the entry of {name} " + "; ".join(
                [f"lacks {', '.join(missing)}"] * bool(missing) + [f"has unknown keys {_short(extra)}"] * bool(extra)))
        if type(meta["size"]) is not int or meta["size"] < 0:
            raise CheckpointError(f"{where}: the size of {name} is {_short(meta['size'])}, not a byte count")
        if not isinstance(meta["sha256"], str) or not SHA256_HEX.fullmatch(meta["sha256"]):
            raise CheckpointError(f"{where}: the sha256 of {name} is {_short(meta['sha256'])}, not 64 hex digits")
    sharded = manifest.get("sharded", False)
    required = list(REQUIRED_SHARDED if sharded else REQUIRED_FILES)
    required += [f"rng-{rank:05d}.pt" for rank in range(1, manifest.get("world_size", 1))]
    missing = [name for name in required if name not in files]
    if missing:
        raise CheckpointError(f"{where} does not list {', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else ""))
    if not sharded and any(name.startswith(f"{SHARDED_DIR}/") for name in files):
        raise CheckpointError(f"{where} lists DCP shards but is not marked sharded")
    return manifest


def _unlisted(path: Path, files: dict) -> str | None:
    """A file or folder in the checkpoint folder that its manifest does not list (it would be read unverified)."""
    listed_dirs = {str(parent) for name in files for parent in PurePosixPath(name).parents} - {"."}
    for top, dirs, names in os.walk(path):
        rel_top = Path(top).relative_to(path).as_posix()
        for name in dirs + names:
            rel = name if rel_top == "." else f"{rel_top}/{name}"
            full = Path(top) / name
            if name.startswith(_IGNORED_PREFIXES):
                continue
            if full.is_symlink():
                return f"{rel} is a symlink"
            if name in dirs:
                if rel not in listed_dirs:
                    return f"{rel}/ is not listed in {MANIFEST}"
            elif rel != MANIFEST and rel not in files:
                return f"{rel} is not listed in {MANIFEST}"
    return None


def _hash_all(path: Path, files: dict) -> dict[str, str]:
    names = sorted(files)
    if len(names) > 1 and sum(files[n]["size"] for n in names) > (64 << 20):
        with ThreadPoolExecutor(min(_HASH_THREADS, len(names))) as pool:
            return dict(zip(names, pool.map(lambda n: _sha256(path / n), names)))
    return {n: _sha256(path / n) for n in names}


def check_safetensors(file: Path, size: int | None = None) -> None:
    """The safetensors header parses, names only known dtypes, and its tensors fill the file exactly (a
    truncated or padded file, overlapping or misshaped tensors): CheckpointError. Reads the header only."""
    size = file.stat().st_size if size is None else size
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{size} bytes, shorter than a header")
            n = struct.unpack("<Q", head)[0]
            if n > min(size - 8, 100 << 20):
                raise ValueError(f"a header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not an object")
        spans = []
        for name, info in header.items():
            if name == "__metadata__":
                if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                    raise ValueError("its metadata is not a string table")
                continue
            if not isinstance(info, dict) or info.get("dtype") not in _SAFETENSORS_BITS:
                raise ValueError(f"tensor {_short(name)} has no known dtype")
            shape, offsets = info.get("shape"), info.get("data_offsets")
            if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
                    or not isinstance(offsets, list) or len(offsets) != 2
                    or not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
                raise ValueError(f"tensor {_short(name)} has a bad shape or offsets")
            numel = 1
            for d in shape:
                numel *= d
            if (numel * _SAFETENSORS_BITS[info["dtype"]] + 7) // 8 != offsets[1] - offsets[0]:
                raise ValueError(f"tensor {_short(name)}: {offsets[1] - offsets[0]} bytes for shape {shape}")
            spans.append(tuple(offsets))
        end = 0
        for begin, stop in sorted(spans):
            if begin != end:
                raise ValueError("its tensors overlap or leave gaps")
            end = stop
        if 8 + n + end != size:
            raise ValueError(f"its tensors end at byte {8 + n + end}, the file has {size} (truncated?)")
    except (OSError, ValueError, UnicodeDecodeError, struct.error) as err:
        raise CheckpointError(f"{file} is not a valid safetensors file: {str(err).splitlines()[0]}") from None


_SAFETENSORS_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6,
                     "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
                     "I64": 64, "U64": 64, "F64": 64, "C64": 64}


def check_torch_file(file: Path) -> None:
    """A torch.save file: a zip archive whose every member lies inside the file. Reads its directory only."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            f.seek(max(size - 22, 0))
            end = f.read(22)
        if len(end) < 22 or end[:4] != b"PK\x05\x06" or end[20:22] != b"\x00\x00":
            raise ValueError("it does not end with a zip directory (truncated or extended?)")
        with zipfile.ZipFile(file) as archive:
            members = archive.infolist()
            if not members:
                raise ValueError("an empty archive")
            for info in members:
                if info.header_offset + info.compress_size > size:
                    raise ValueError(f"member {_short(info.filename)} lies past the end")
    except (OSError, ValueError, zipfile.BadZipFile, NotImplementedError) as err:
        raise CheckpointError(f"{file} is not a valid torch file: {str(err).splitlines()[0]}") from None


def _check_trainer_state(path: Path) -> None:
    file = path / TRAINER_STATE
    try:
        state = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{file} is not JSON: {str(err).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} is not a JSON object")
    if not isinstance(state.get("config", {}), dict) or not isinstance(state.get("extra", {}), dict):
        raise CheckpointError(f"{file}: config or extra is not an object")
    for key in ("epoch", "batches_done", "global_step", "world_size"):
        if key in state and type(state[key]) is not int:
            raise CheckpointError(f"{file}: {key} is {_short(state[key])}, not an integer")


def _check_contents(path: Path, manifest: dict) -> None:
    """Every file, as hashed, parses as what it should be (a manifest that vouches for a truncated file)."""
    files = manifest["files"]
    _check_trainer_state(path)
    for name, meta in files.items():
        if name.endswith(".safetensors"):
            check_safetensors(path / name, meta["size"])
        elif name.endswith(".pt"):
            check_torch_file(path / name)
    if manifest.get("sharded"):
        check_dcp_metadata(path, files)


def check_dcp_metadata(path: Path, files: dict) -> None:
    """DCP's metadata loads and every tensor it indexes lies inside a listed shard file (a manifest that vouches
    for a truncated shard). Raises CheckpointError."""
    import torch.distributed.checkpoint as dcp  # ~0.8 s to import: sharded checkpoints only

    try:
        metadata = dcp.FileSystemReader(str(Path(path) / DCP_DIR)).read_metadata()
        storage = metadata.storage_data
        if not isinstance(storage, dict) or not storage:
            raise ValueError("it indexes no storage")
        for index, info in storage.items():
            name = f"{DCP_DIR}/{info.relative_path}"
            if name not in files:
                raise ValueError(f"{getattr(index, 'fqn', index)} is in {info.relative_path}, which is not listed")
            if not (isinstance(info.offset, int) and isinstance(info.length, int) and info.offset >= 0
                    and info.length >= 0 and info.offset + info.length <= files[name]["size"]):
                raise ValueError(f"{getattr(index, 'fqn', index)} lies past the end of {info.relative_path} "
                                 f"(truncated?)")
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - an unpickling error of any type: not a DCP checkpoint
        raise CheckpointError(f"{path}/{DCP_DIR}/.metadata is not valid DCP metadata: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def validate(path: str | os.PathLike) -> dict:
    """Return the manifest of a complete checkpoint, or raise CheckpointError saying (in one line) what is wrong:
    a manifest off its schema, a file missing, unlisted, of another size or sha256, or that does not parse."""
    path = Path(path)
    try:
        return _validate(path)
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - e.g. an I/O error: whatever it is, not a checkpoint to load
        lines = str(err).strip().splitlines()
        raise CheckpointError(f"{path} cannot be validated ({type(err).__name__}: "
                              f"{lines[0][:200] if lines else ''})") from None


def _validate(path: Path) -> dict:
    identity = _manifest_identity(path)
    try:
        text = (path / MANIFEST).read_text()
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {MANIFEST} (incomplete write?)") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}/{MANIFEST} is unreadable: {str(err).splitlines()[0]}") from None
    manifest = parse_manifest(text, f"{path}/{MANIFEST}")
    files = manifest["files"]
    for fname, meta in files.items():
        file = path / fname
        if file.is_symlink() or not file.is_file():
            raise CheckpointError(f"{path} is missing {fname}")
        if file.stat().st_size != meta["size"]:
            raise CheckpointError(f"{path}/{fname} has {file.stat().st_size} bytes, expected {meta['size']}")
    if (path / SHARDED_DIR).is_dir() != bool(manifest.get("sharded")):
        raise CheckpointError(f"{path}: {SHARDED_DIR}/ and the manifest disagree on whether it is sharded")
    unlisted = _unlisted(path, files)
    if unlisted is not None:
        raise CheckpointError(f"{path}: {unlisted}")
    try:
        digests = _hash_all(path, files)
    except OSError as err:
        raise CheckpointError(f"{path} is unreadable: {str(err).splitlines()[0]}") from None
    for fname, digest in digests.items():
        if digest != files[fname]["sha256"]:
            raise CheckpointError(f"{path}/{fname} does not match its checksum (corrupted)")
    _check_contents(path, manifest)
    if identity is not None and identity == _manifest_identity(path):
        _VALIDATED[str(path.resolve())] = identity
    return manifest
