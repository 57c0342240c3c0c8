"""Agreement between ranks at O(1) per rank: the lowest rank that failed, and what that one rank has.

Each is a no-op in a single process. The fault handling (write failures) and the checkpoints both use
them, so they live here, below both.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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
