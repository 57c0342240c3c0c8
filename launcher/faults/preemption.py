"""Preemption: signals set a flag, ranks agree at step boundaries, and nobody does I/O in a handler.

SLURM (or a user) sends SIGUSR1 or SIGTERM; the handler only records it. At each optimizer-step boundary
`PreemptionWatch.should_stop()` tells every rank the same answer: the flags are max-reduced across ranks.
The all-reduce is started asynchronously at one boundary and read at the next, so a step never waits on
it; the decision is one step late but identical everywhere. It runs on a gloo group of its own so it never
syncs a GPU stream and never interleaves with the model's collectives.
"""

from __future__ import annotations

import signal
import types

import torch
import torch.distributed as dist

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatch:
    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS):
        self.received: int | None = None  # signal number; set by the handler, read at step boundaries
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self._group = None  # None: the default group
        self._own_group = False
        self._pending = None
        self._flag = torch.zeros(1, dtype=torch.int32)
        self._agreed = False
        if self._distributed and dist.get_backend() != "gloo":
            # Every rank creates the group in the same order (collective), so this stays in __init__.
            self._group, self._own_group = dist.new_group(backend="gloo"), True
        # A CPU run's default group is gloo already; a second gloo group would bring its own threads and
        # sockets, which cost ~0.4 ms per step on a 2-core machine (bench/RESULTS.md).

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        # Nothing else here: no I/O, no locks, no collectives (a second signal just lands here again).
        self.received = signum

    def should_stop(self) -> bool:
        """Called by every rank at every step boundary; the same answer on every rank."""
        if self._agreed:
            return True
        if not self._distributed:
            self._agreed = self.received is not None
            return self._agreed
        if self._pending is not None:
            self._pending.wait()
            self._agreed = bool(self._flag.item())
        if not self._agreed:
            self._flag.fill_(1 if self.received is not None else 0)
            self._pending = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return self._agreed

    def close(self) -> None:
        """Finish the collective in flight and give the signal handlers back."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
        if self._own_group:
            dist.destroy_process_group(self._group)
            self._group, self._own_group = None, False
