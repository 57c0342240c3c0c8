"""torchrun's in-job restarts (`accelerate launch --max_restarts N`): the restarted workers must find each other.

torchrun's static rendezvous (accelerate's default) keeps one TCPStore, hosted by the node-0 agent, for
every attempt. A restarted worker's `init_process_group` writes and reads the same keys as the attempt
that died, so it may read a dead worker's address before the new one has overwritten it: gloo then fails
with "connectFullMesh ... Connection refused", or waits for the init timeout. (The c10d rendezvous has the
same problem while it shares its store; TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 stops that, not for static.)

The fix here: on a restart (TORCHELASTIC_RESTART_COUNT > 0) the worker joins the default process group
itself, through the same store with the attempt number as a key prefix, before Accelerate would. Accelerate
then finds the group initialized and uses it. The first attempt is left to Accelerate, unchanged.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist


def restart_count() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def join_restarted_group(backend: str, timeout: timedelta) -> bool:
    """On a torchrun restart, initialize the default group on a per-attempt store prefix. Returns whether it did."""
    attempt = restart_count()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if attempt == 0 or world_size < 2 or not dist.is_available() or dist.is_initialized():
        return False
    rank = int(os.environ["RANK"])
    # The agent hosts the store (TORCHELASTIC_USE_AGENT_STORE=True), else rank 0 does, as torch's env:// does.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=not agent_store and rank == 0, timeout=timeout)
    dist.init_process_group(backend, store=dist.PrefixStore(f"launcher-attempt-{attempt}/", store), rank=rank,
                            world_size=world_size, timeout=timeout)
    return True
