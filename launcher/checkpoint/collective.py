"""The collectives a checkpoint needs, each a no-op in a single process: gather to all, barrier, the first error."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def _gather_to_all(obj: Any) -> list[Any]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def first_error(error: str | None) -> str | None:
    """Collective: the lowest rank's error, so that every rank takes the same decision."""
    everyone = _gather_to_all(error)
    return next((e for e in everyone if e is not None), None)
