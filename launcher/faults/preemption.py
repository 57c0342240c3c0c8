"""Preemption: signals set a flag, ranks agree at step boundaries, and nobody does I/O in a handler.

SLURM (or a user) sends SIGUSR1 or SIGTERM; the handler only records it. At optimizer-step boundaries
`PreemptionWatch.should_stop()` tells every rank the same answer: the flags are max-reduced across ranks.

The vote is not taken at every step: at a thousand ranks an all-reduce per step can take longer than the step,
and SLURM's warning comes minutes ahead (`--signal=USR1@120`). It is taken every `every` steps, a number the
ranks agree on in the vote itself: each rank proposes how many of its steps fit into `interval_s` (measured
since the previous vote, at most twice the previous cadence) and the smallest proposal wins. The all-reduce
starts asynchronously at one vote and is read at the next, so no step waits on it. A signal is therefore acted on
at most two vote periods (plus one step) after it arrives: at a steady pace and the default 2 s, within ~4 s plus
a step of the slowest rank, far inside SLURM's grace time (docs/faults.md). Between votes `should_stop` is a
counter decrement: no collective, no host sync.

On a gloo default group (CPU runs) the vote uses it; under NCCL it runs on the default group too, with a
device tensor read one vote later (a stream sync every few seconds), so no extra process group is built.
"""

from __future__ import annotations

import math
import os
import signal
import time
import types

import torch
import torch.distributed as dist

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
INTERVAL_ENV = "LAUNCHER_PREEMPTION_INTERVAL"  # seconds between votes (default DEFAULT_INTERVAL_S)
DEFAULT_INTERVAL_S = 2.0
MAX_EVERY = 10_000  # steps between votes, whatever the pace (a step of microseconds)


def steps_in(interval_s: float, seconds: float, steps: int) -> int:
    """How many steps at the pace of `steps` steps in `seconds` fit into `interval_s` (at least 1)."""
    if steps <= 0 or seconds <= 0:
        return MAX_EVERY if steps > 0 else 1
    return max(1, min(MAX_EVERY, math.floor(interval_s * steps / seconds)))


class PreemptionWatch:
    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS, interval_s: float | None = None):
        self.received: int | None = None  # signal number; set by the handler, read at step boundaries
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._signals = {int(s) for s in signals}
        # Python runs a handler only between bytecodes of the main thread, never while it is blocked in a
        # collective; its C-level handler still writes the signal's number to the wakeup fd, which the
        # watchdog's thread reads (`poll`) to bound the wait for a step boundary (launcher.faults.watchdog).
        self._wakeup_read, wakeup_write = os.pipe()
        os.set_blocking(self._wakeup_read, False)
        os.set_blocking(wakeup_write, False)
        self._wakeup_write = wakeup_write
        self._previous_wakeup = signal.set_wakeup_fd(wakeup_write, warn_on_full_buffer=False)
        self.interval_s = interval_s if interval_s is not None else float(
            os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S))
        self._distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        device = (torch.device("cuda", torch.cuda.current_device())
                  if self._distributed and dist.get_backend() == "nccl" else torch.device("cpu"))
        # [any rank signalled, -(steps until the vote after next)]: one MAX all-reduce decides both.
        self._vote = torch.zeros(2, dtype=torch.float64, device=device)
        self._pending = None
        self._agreed = False
        self.every = 1  # steps between votes, agreed by every rank
        self._countdown = 1
        self._last_vote: float | None = None
        self.votes = 0  # collectives started (bench/scale.py counts them too)

    def poll(self) -> str | None:
        """The name of a preemption signal that arrived since the last call, read without waiting (any thread)."""
        try:
            data = os.read(self._wakeup_read, 512)
        except (BlockingIOError, OSError):
            return None
        mine = [b for b in data if b in self._signals]
        return signal.Signals(mine[0]).name if mine else None

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
        self._countdown -= 1
        if self._countdown > 0:
            return False
        now, steps_since = time.monotonic(), self.every
        if self._pending is not None:
            self._pending.wait()
            flag, minus_every = self._vote.tolist()
            self._agreed, self.every = bool(flag), int(-minus_every)
        if not self._agreed:
            # At most double the cadence per vote: a pace measured over a few quick steps (or the first ones)
            # must not push the next vote past the end of the run.
            proposal = 1 if self._last_vote is None else min(
                2 * self.every, steps_in(self.interval_s, now - self._last_vote, steps_since))
            self._vote.copy_(torch.tensor([1.0 if self.received is not None else 0.0, -float(proposal)]))
            self._pending = dist.all_reduce(self._vote, op=dist.ReduceOp.MAX, async_op=True)
            self.votes += 1
        self._countdown, self._last_vote = self.every, now
        return self._agreed

    def close(self) -> None:
        """Finish the collective in flight and give the signal handlers back."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
        if self._wakeup_write is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            for fd in (self._wakeup_read, self._wakeup_write):
                os.close(fd)
            self._wakeup_write = None
