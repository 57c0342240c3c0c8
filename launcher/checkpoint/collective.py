"""The collectives a checkpoint needs, each a no-op in a single process, each O(1) per rank in the world size:
the lowest rank's error (`first_error`), a barrier, a sum of additive statistics, rank 0's verdict for all.

Nothing here sends one rank's data to every other rank: at a thousand ranks an all-gather of even a small
object costs every rank a thousand times its size (and two host syncs per rank on NCCL).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from launcher.faults.agreement import _distributed, first_failing_rank, from_rank


def _barrier() -> None:
    if _distributed():
        dist.barrier()


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
