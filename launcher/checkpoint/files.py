"""Durable file writes: fsync, write-then-rename (`write_json_atomic`, `write_text_atomic`), a line appended whole
(`append_line_durable`), a file's sha256, and weights as safetensors (`save_weights`)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


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
    """Weights as safetensors on the CPU: what checkpoints and final/ hold, loadable without unpickling.

    Tied or otherwise shared parameters (GPT-2's tie_word_embeddings: the embedding and the output head are
    one tensor under two names) break safetensors' rule that no two tensors share memory. transformers drops
    the tied names and re-ties them after loading; here every name keeps its own copy instead, so every file
    still loads with a plain `load_file` + `load_state_dict(strict=True)` (export, final/, other tools), and
    loading writes the same values into the one shared parameter. Costs the shared tensors' size on disk.
    """
    tensors, storages = {}, set()
    for name, value in state_dict.items():
        tensor = value.detach().contiguous().cpu()
        storage = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        if storage in storages:
            tensor = tensor.clone()
        elif storage is not None:
            storages.add(storage)
        tensors[name] = tensor
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~_umask())  # safetensors (0.8) creates its file 0600: the umask decides, as for open()


def _umask() -> int:
    """This process's umask, without changing it (os.umask can only be read by setting it, racing threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_parquet_atomic(path: Path, columns: dict[str, list]) -> None:
    """A table of plain columns as parquet, written whole or not at all (temp file, fsync, rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(pa.table(columns), tmp)
        _fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
