"""What each rank contributes to a checkpoint, in O(1) per rank at any world size.

- RNG: every rank writes its own small file (`rng.pt` for rank 0, `rng-00001.pt`, ...) into the checkpoint's
  temp folder before rank 0 commits, and reads only its own on resume. No rank receives another's state.
- The position of a loader that keeps its own (a stream's `state_dict()`, e.g. launcher.data.streaming): in
  the same file, so it costs no collective and no rank reads another's. It is only meaningful to the rank that
  wrote it at the same world size (older checkpoints kept every rank's in trainer_state.json's
  `extra.loader_states`, which a resume still reads).
- Training statistics of the epoch in progress: they are only ever summed (the epoch's one all-reduce), so
  the checkpoint stores their sum, made by one all-reduce; on resume rank 0 starts from the sum and every other
  rank from zero, which sums to the same epoch totals at any world size. The statistics are an opaque dict of
  numbers, lists or tensors.

Checkpoints written before this layout (`rng.pt` with every rank's state, `train_stats` a list per rank) still
load: `read_rank_rng` and `read_stats` read both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from launcher.faults.agreement import _device, _distributed

RNG_FILE = "rng.pt"
STATS_REDUCED = "train_stats_reduced"  # trainer_state.json: True when train_stats is the sum of every rank's


def rng_file(rank: int) -> str:
    """The file of `rank`'s RNG states in a checkpoint folder."""
    return RNG_FILE if rank == 0 else f"rng-{rank:05d}.pt"


def write_rank_rng(folder: Path, rank: int, state: dict, stats: dict | None = None,
                   loader: dict | None = None) -> Path:
    """This rank's RNG states, its own partial-epoch statistics and its loader's position (`loader`, when
    the loader keeps one), durably, into `folder` (the checkpoint's temp folder). The statistics are kept per
    rank as well as summed: a resume on the same world size restores each rank's own sums, so the epoch's
    totals are added in the same order as without the interruption (bit-identical; the float sum of a sum is
    not)."""
    from launcher.checkpoint.files import _fsync_path

    path = folder / rng_file(rank)
    saved = {"rank": rank, "state": state, "stats": stats}
    if loader is not None:
        saved["loader"] = loader
    torch.save(saved, path)
    _fsync_path(path)
    return path


def read_rank_rng(folder: Path, rank: int, load: Any = None) -> dict | None:
    """`rank`'s RNG states from a checkpoint (None when that rank did not exist); reads only its own file."""
    return read_rank_file(folder, rank, load)[0]


class RankFile(NamedTuple):
    """What one rank's own file of a checkpoint holds."""

    rng: dict | None  # None: a rank this checkpoint did not have
    stats: dict | None  # its own partial-epoch statistics
    kept: bool  # whether the file holds them (False in files written before they were kept per rank)
    loader: dict | None = None  # its loader's position, when the loader keeps one


def read_rank_file(folder: Path, rank: int, load: Any = None) -> RankFile:
    """`rank`'s own file of a checkpoint (RNG states, statistics, loader position); reads only that file."""
    load = load or (lambda p: torch.load(p, weights_only=True))
    own = folder / rng_file(rank)
    # No file of its own: a rank this checkpoint did not have, or the older layout (rank 0's file held all).
    saved = load(own if own.is_file() else folder / RNG_FILE)
    if "ranks" in saved:  # the older layout: every rank's states in rank 0's file
        ranks = saved["ranks"]
        return RankFile((ranks[rank] if rank < len(ranks) else None), None, False)
    if saved.get("rank") != rank:
        return RankFile(None, None, False)
    return RankFile(saved["state"], saved.get("stats"), "stats" in saved, saved.get("loader"))


def _flat(stats: dict | None, keys: list[str]) -> torch.Tensor:
    parts = [torch.as_tensor(stats[k], dtype=torch.float64).flatten() for k in keys] if stats else []
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _unflat(flat: torch.Tensor, like: dict, keys: list[str]) -> dict:
    out, at = {}, 0
    for k in keys:
        ref = like[k]
        n = torch.as_tensor(ref).numel()
        part = flat[at:at + n]
        at += n
        if torch.is_tensor(ref):
            out[k] = part.reshape(ref.shape).to(ref.dtype)
        elif isinstance(ref, (list, tuple)):
            out[k] = part.reshape(torch.as_tensor(ref).shape).tolist()
        else:
            out[k] = part.item()
    return out


def reduce_with_flags(stats: dict | None, flags: list[float]) -> tuple[dict | None, list[float]]:
    """Collective, one all-reduce: the sum over ranks of `stats` (an additive dict, None on no rank or every
    rank) and of `flags` (e.g. 'my loss is not finite'). Returns (the summed stats, the summed flags)."""
    keys = sorted(stats) if stats else []
    flat = torch.cat([_flat(stats, keys), torch.tensor(flags, dtype=torch.float64)])
    if _distributed():
        device = _device()
        on_device = flat.to(device)
        dist.all_reduce(on_device)
        flat = on_device.cpu()
    summed_flags = flat[len(flat) - len(flags):].tolist()
    return (_unflat(flat[: len(flat) - len(flags)], stats, keys) if stats else None), summed_flags


def read_stats(raw: dict, rank: int) -> dict | None:
    """This rank's share of a checkpoint's training statistics, from its trainer_state.json as loaded.

    Reduced (this layout): rank 0 takes the sum, the others start from zero (None). Per rank (the older
    layout): on the same world size each rank takes its own; `sum_saved` adds them up for another world size.
    """
    saved = raw.get("train_stats")
    if raw.get(STATS_REDUCED):
        return saved if rank == 0 else None
    saved = saved or []
    return saved[rank] if rank < len(saved) else None


def sum_saved(raw: dict) -> dict | None:
    """Every rank's training statistics of a checkpoint added together (either layout)."""
    saved = raw.get("train_stats")
    if raw.get(STATS_REDUCED) or saved is None:
        return saved
    parts = [s for s in saved if s is not None]
    if not parts:
        return None
    keys = sorted(parts[0])
    return _unflat(torch.stack([_flat(p, keys) for p in parts]).sum(0), parts[0], keys)


def tmp_suffix() -> str:
    """The same on every rank of this job (each rank writes into rank 0's temp folder), different from a
    concurrent single-process writer's; the lease keeps two jobs out of one folder."""
    if _distributed():
        return f"w{dist.get_world_size()}"
    return str(os.getpid())
