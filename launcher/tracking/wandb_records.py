"""Read W&B's local run files (`run-<id>.wandb`) without a network or a W&B account.

Every W&B run, online or offline, writes a transaction log `<wandb dir>/<offline-run|run>-<time>-<id>/run-<id>.wandb`
that `wandb sync` uploads later. wandb 0.31 ships no reader for it (the old `wandb.sdk.internal.datastore`
is gone with the Go core), so this module parses it: a LevelDB-style log (a 7-byte file header
`:W&B` + magic 0xBEE1 + version 0, then 32 KiB blocks of chunks, each with a 7-byte header
crc32/length/type, type FULL, FIRST, MIDDLE or LAST) whose records are `wandb_internal_pb2.Record` messages.

A run killed with SIGKILL leaves a file that ends early: wandb-core writes the log in blocks and flushes it
about every 15 s. The reader returns what is complete and says whether the file ended cleanly.
Tests use it to check what a training run logged; users can use it to inspect an offline run before syncing.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK_SIZE = 32 * 1024
CHUNK_HEADER_SIZE = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class RecordFileError(Exception):
    """The file is not a W&B transaction log."""


def iter_record_bytes(path: str | Path) -> Iterator[bytes]:
    """Yield the serialized records of a .wandb file in order.

    Stops quietly at a truncated or corrupt tail (a killed writer); raises RecordFileError for a file
    that does not start with the W&B header.
    """
    for payload, _clean in _iter_chunks_with_status(Path(path)):
        if payload is not None:
            yield payload


def _iter_chunks_with_status(path: Path) -> Iterator[tuple[bytes | None, bool]]:
    data = path.read_bytes()
    if not data.startswith(HEADER):
        raise RecordFileError(f"{path} is not a W&B run file (no ':W&B' header)")
    pos = len(HEADER)
    pending: bytearray | None = None
    while True:
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER_SIZE:
            pos += left_in_block  # block trailer: zero padding too short for a chunk header
            continue
        if pos >= len(data):
            yield None, pending is None
            return
        if pos + CHUNK_HEADER_SIZE > len(data):
            yield None, False
            return
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        start = pos + CHUNK_HEADER_SIZE
        chunk = data[start:start + length]
        if kind == 0 and length == 0 and crc == 0:
            # Zero fill: the writer padded the rest of the block (or preallocated); skip to the next block.
            pos += left_in_block
            continue
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            yield None, False
            return
        pos = start + length
        if kind == FULL:
            yield bytes(chunk), True
            pending = None
        elif kind == FIRST:
            pending = bytearray(chunk)
        elif kind in (MIDDLE, LAST) and pending is not None:
            pending += chunk
            if kind == LAST:
                yield bytes(pending), True
                pending = None
        else:
            yield None, False
            return


def iter_records(path: str | Path) -> Iterator[Any]:
    """Yield `wandb.proto.wandb_internal_pb2.Record` messages of a .wandb file."""
    from wandb.proto import wandb_internal_pb2

    for payload in iter_record_bytes(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


@dataclass
class RunFile:
    """What one .wandb file (one process start of a run) holds, decoded."""

    path: Path
    run_id: str = ""
    project: str = ""
    entity: str = ""
    group: str = ""
    job_type: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)
    resume: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per step, with "_step"
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)  # define_metric calls
    # log_artifact calls: {"name", "type", "aliases", "files" (paths in the artifact), "metadata"}
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int | None = None  # None: the process never reported an exit (killed)
    preempting: bool = False
    complete: bool = True  # False: the file ends in a truncated or corrupt chunk

    def history_with(self, key: str) -> list[dict[str, Any]]:
        """The history rows that contain `key`."""
        return [row for row in self.history if key in row]


def _item_path(item: Any) -> list[str]:
    return list(item.nested_key) if item.nested_key else [item.key]


def _set_path(target: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        node = target.get(part)
        if not isinstance(node, dict):
            node = target[part] = {}
        target = node
    target[path[-1]] = value


def _del_path(target: dict[str, Any], path: list[str]) -> None:
    for part in path[:-1]:
        target = target.get(part)
        if not isinstance(target, dict):
            return
    target.pop(path[-1], None)


def _history_value(item: Any) -> Any:
    # wandb writes value_json (x_history_value_encoding="json"); the typed oneof serves other encodings.
    if item.value_json:
        return json.loads(item.value_json)
    kind = item.WhichOneof("value")
    if kind is None or kind == "none":
        return None
    value = getattr(item, kind)
    return json.loads(value) if kind == "json" else value


def _apply_config(config: dict[str, Any], record: Any) -> None:
    for item in record.update:
        _set_path(config, _item_path(item), json.loads(item.value_json))
    for item in record.remove:
        _del_path(config, _item_path(item))


def read_run_file(path: str | Path) -> RunFile:
    """Decode one .wandb file: run metadata, config, history rows, the final summary, exit code."""
    path = Path(path)
    run = RunFile(path=path)
    clean = True
    from wandb.proto import wandb_internal_pb2

    for payload, ok in _iter_chunks_with_status(path):
        if payload is None:
            clean = ok
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.project, run.entity = r.run_id, r.project, r.entity
            run.group, run.job_type, run.name = r.run_group, r.job_type, r.display_name
            run.tags, run.resume = list(r.tags), r.resume
            _apply_config(run.config, r.config)
        elif kind == "config":
            _apply_config(run.config, record.config)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set_path(row, _item_path(item), _history_value(item))
            row.setdefault("_step", record.history.step.num)
            run.history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _set_path(run.summary, _item_path(item), json.loads(item.value_json))
            for item in record.summary.remove:
                _del_path(run.summary, _item_path(item))
        elif kind == "metric":
            m = record.metric
            run.metrics.append({"name": m.name or m.glob_name, "step_metric": m.step_metric,
                                "summary": [f.name for f, v in m.summary.ListFields() if v]})
        elif kind == "artifact":
            a = record.artifact
            run.artifacts.append({"name": a.name, "type": a.type, "aliases": sorted(a.aliases),
                                  "files": sorted(c.path for c in a.manifest.contents),
                                  "metadata": json.loads(a.metadata) if a.metadata else {}})
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
        elif kind == "preempting":
            run.preempting = True
    run.config.pop("_wandb", None)
    run.complete = clean
    return run


def find_run_files(wandb_dir: str | Path, run_id: str | None = None) -> list[Path]:
    """The .wandb files under a W&B directory (WANDB_DIR or its `wandb/` folder), oldest process start first.

    A resumed run has one folder per process start, all with the same id; `wandb sync` uploads them in
    this order.
    """
    root = Path(wandb_dir)
    if (root / "wandb").is_dir():
        root = root / "wandb"
    pattern = f"*-{run_id}/run-{run_id}.wandb" if run_id else "*-*/run-*.wandb"
    files = [p for p in root.glob(pattern) if not p.parent.is_symlink()]
    # Folder names are <offline-run|run>-YYYYMMDD_HHMMSS-<id>: sort by the timestamp, then by file age.
    return sorted(files, key=lambda p: (p.parent.name.split("-")[-2] if p.parent.name.count("-") >= 2 else "",
                                        p.stat().st_mtime))
