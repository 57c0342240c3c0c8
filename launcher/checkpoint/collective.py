"""The collectives a checkpoint needs, each a no-op in a single process, each O(1) per rank in the world size:
the lowest rank's error (`first_error`), a barrier, a sum of additive statistics, rank 0's verdict for all.

Nothing here sends one rank's data to every other rank: at a thousand ranks an all-gather of even a small
object costs every rank a thousand times its size (and two host syncs per rank on NCCL).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_to_all(obj: Any) -> list[Any]:
    """Every rank's `obj` on every rank: O(world size) per rank; kept for callers outside the checkpoint."""
    if _distributed():
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _device() -> torch.device:
    """Where a small tensor must live for the default group (NCCL reduces only device tensors)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def first_failing_rank(failed: bool) -> int | None:
    """Collective (one all-reduce of one number): the lowest rank with `failed`, or None."""
    if not _distributed():
        return 0 if failed else None
    world = dist.get_world_size()
    lowest = torch.tensor([dist.get_rank() if failed else world], dtype=torch.int64, device=_device())
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    rank = int(lowest.item())
    return None if rank == world else rank


def from_rank(obj: Any, rank: int) -> Any:
    """Collective: `obj` as rank `rank` has it (a broadcast; only called on the rare path that needs it)."""
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=rank)
    return box[0]


def first_error(error: str | None) -> str | None:
    """Collective: the lowest rank's error, so that every rank takes the same decision. One all-reduce of one
    number when no rank has an error; a broadcast of the message from that rank when one has."""
    rank = first_failing_rank(error is not None)
    if rank is None:
        return None
    return from_rank(error, rank)


def main_decides(decide: Any, is_main: bool) -> Any:
    """Collective: rank 0 computes `decide()` (a plain value), every rank returns it (one broadcast)."""
    value = decide() if is_main else None
    return from_rank(value, 0)
