"""A rank that stops making progress ends the job within a bound, and the error names that rank.

Torch alone waits 30 minutes (gloo) or 10 (NCCL) in a collective whose peer has stopped, and the rank
that times out first names nobody: it is the victim, not the culprit. Here every rank runs one daemon
thread that reads the loop's progress counter (the step position `fit` keeps anyway, so the training step
itself pays nothing) about once a second. When it has not moved for the bound of the current phase:

1. `monitored_barrier(wait_all_ranks=True)` on a gloo group of the watchdog's own: every live rank's
   thread arrives (its main thread may be blocked in a collective; the thread is not). Rank 0 learns
   exactly which ranks did not arrive: processes that are stopped (SIGSTOP, state T), frozen or gone.
   Rank 0 publishes that list under one key of the rendezvous store; the others read it (a rank 0 that
   does not answer is itself the culprit).
2. If every rank arrived (all alive, none progressing), the ranks exchange where their main thread is.
   A rank whose main thread is waiting inside torch (a collective, the backward's all-reduce) or whose GPU
   still has work queued is a victim: on a GPU a collective returns at once and the rank then waits at
   its next read of a result (`.item()`, `.tolist()`, `.cpu()` in the loop), so its main thread is in
   launcher code while its stream waits for the peers. The others (stuck in a data loader, a deadlock in
   user code, with an idle GPU) are the culprits.
3. A live rank on the same host as a stopped culprit (state T) SIGKILLs it (it never handles the SIGTERM
   torchrun sends first, and torchrun waits 30 s before its SIGKILL); the lowest healthy rank prints one
   line naming the culprit ranks and hosts; every live rank leaves with `os._exit(EXIT_HUNG)`, so torchrun
   (and srun) see the failure at once and tear the rest down.

Phases: training steps are bounded by `collective_timeout`. Start-up (up to the first step, which
includes the first batch and any compilation), validation, checkpoint writes and the final save are
bounded by `init_timeout`, and so is a step during which torch.compile compiles again (a new shape, such as
an epoch's short last batch: some thread is in dynamo's or inductor's compiler, seen by walking the
threads' stacks each second; a rank counts itself in a store counter while it compiles, so that its peers,
waiting for it in a collective, wait as long); the process group's own timeout follows the phase (torch's
`_set_pg_timeout`) as a backstop a little beyond the watchdog's bound.

One process (no process group, e.g. single_gpu.yaml) has the same watchdog and the same bounds: it names
itself and where its main thread is, and ends with EXIT_HUNG.

At 1,000 ranks: nothing is written per step; each rank's thread wakes about once a second and reads an
integer. At start-up each rank publishes its host and pid once (one all_gather). When a hang is detected:
one monitored barrier (rank 0 receives 999 small messages), one store key written and read by every
rank, one `store.add` per rank. The gloo group is idle until then (2 sleeping threads per rank).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from launcher.errors import EXIT_HUNG
from launcher.faults.timeouts import Timeouts

# Set when the job ends because a rank hung: one line for the batch script to repeat (launcher submit).
FAULT_FILE_ENV = "LAUNCHER_FAULT_FILE"
_TORCH_DIR = str(Path(torch.__file__).parent)


def nccl_environment() -> dict[str, str]:
    """The NCCL watchdog and flight-recorder settings `make_accelerator` sets (unless already set) on GPUs.

    - TORCH_NCCL_ASYNC_ERROR_HANDLING is left to torch (3 since torch 2.2: a collective past the group's
      timeout ends the process without `ncclCommAbort`, which can itself hang on a wedged GPU; 1 would abort).
    - TORCH_NCCL_TRACE_BUFFER_SIZE=2000 and TORCH_NCCL_DUMP_ON_TIMEOUT=1: the flight recorder keeps the
      last 2,000 collectives per rank and dumps them on a timeout, to TORCH_NCCL_DEBUG_INFO_TEMP_FILE
      (default /tmp/nccl_trace_rank_<rank>); `torchfrtrace` (torch.distributed.flight_recorder) reads them.
    - TORCH_NCCL_ENABLE_MONITORING=1: a heartbeat thread ends the process if NCCL's own watchdog hangs.
    """
    return {"TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
            "TORCH_NCCL_ENABLE_MONITORING": "1"}


class NoWatchdog:
    """What a run without a process group to watch gets: the same interface, doing nothing."""

    def training(self) -> None:
        pass

    @contextlib.contextmanager
    def slow(self) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        yield

    def tick(self) -> None:
        pass

    def watch_signals(self, preemption: Any) -> None:
        pass

    def close(self) -> None:
        pass


NO_WATCHDOG = NoWatchdog()


class Watchdog(NoWatchdog):
    """Start on every rank at the same point (with a process group it creates one); `close` on every rank."""

    def __init__(self, progress: Callable[[], Any], timeouts: Timeouts):
        self.progress, self.timeouts = progress, timeouts
        distributed = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        # SLURM's node name where there is one: on a cluster it is what a user looks up (sinfo, scontrol).
        self.host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        # The GPU the main thread trains on (the current device is per thread): whether it still has work queued.
        self._device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() \
            else None
        # The phase's bound; written by the main thread at phase changes only, read by the thread.
        self._bound, self._since, self._warm = timeouts.init, time.monotonic(), False
        self.ticks = 0  # evaluation batches done: progress the thread sees beside the loop's position
        self._phase = "start-up"
        self._preemption: Any = None  # a PreemptionWatch whose signals bound every phase but a save
        self._signalled: tuple[float, str] | None = None
        # A torchrun worker whose agent is gone (`accelerate launch` killed) is reparented: it ends itself
        # instead of living on as an orphan, hung in a collective with its peers.
        self._parent = os.getppid() if os.environ.get("TORCHELASTIC_RUN_ID") else None
        self._group = None
        self.peers: list[tuple[str, int]] = [(self.host, os.getpid())]
        if distributed:
            self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeouts.init))
            peers: list[Any] = [None] * self.world
            dist.all_gather_object(peers, (self.host, os.getpid()), group=self._group)
            self.peers = [tuple(p) for p in peers]
            # One namespace per torchrun attempt: a restarted job must not read a dead attempt's verdict.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            self._store = dist.PrefixStore(f"launcher-watchdog/{attempt}/",
                                           dist.distributed_c10d._get_default_store())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="launcher-watchdog", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- main thread: phase changes

    def training(self) -> None:
        """Steps follow: bounded by the collective timeout (once the first step has been made)."""
        self._set_phase(self.timeouts.collective, "training")

    @contextlib.contextmanager
    def slow(self, phase: str = "checkpoint") -> Iterator[None]:
        """A checkpoint write, the final save: bounded by the init timeout."""
        previous = self._bound, self._phase
        self._set_phase(self.timeouts.init, phase)
        try:
            yield
        finally:
            self._set_phase(*previous)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Validation, evaluation, prediction: each batch (`tick`) is bounded by the collective timeout like a
        training step, the first one too (the same bound on every rank, so that all of them fire together and
        meet at the monitored barrier; a compilation gets the init timeout as in training)."""
        previous = self._bound, self._phase
        self._set_phase(self.timeouts.collective, "evaluation")
        try:
            yield
        finally:
            self._set_phase(*previous)

    def tick(self) -> None:
        """An evaluation batch is done (the main thread, once per batch: one increment)."""
        self.ticks += 1

    def watch_signals(self, preemption: Any) -> None:
        """Bound the wait for a step boundary after SIGTERM/SIGUSR1: a main thread blocked in a collective never
        runs the Python signal handler, so the preemption never comes; this thread reads the signal from the
        handler's wakeup pipe (`PreemptionWatch.poll`) and, outside a checkpoint write, ends the job once no
        progress was made for the collective timeout since the signal."""
        self._preemption = preemption

    def _set_phase(self, bound: float, phase: str) -> None:
        self._bound, self._since, self._phase = bound, time.monotonic(), phase
        if self._group is None:
            return
        # The group's own timeout backs the watchdog up, a little later than it fires.
        backstop = bound + 3 * self.timeouts.grace + self.timeouts.poll
        with contextlib.suppress(Exception):  # private API: its absence only loses the backstop
            dist.distributed_c10d._set_pg_timeout(timedelta(seconds=backstop))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        if self._group is None:
            return
        with contextlib.suppress(Exception):  # also on the way out of a failed run: never mask its error
            dist.distributed_c10d._set_pg_timeout(timedelta(seconds=self.timeouts.init))
            dist.destroy_process_group(self._group)

    # ---------------------------------------------------------------- the watchdog thread

    def _watch(self) -> None:
        last, changed, compiling = (self.progress(), self.ticks), time.monotonic(), False
        while not self._stop.wait(self.timeouts.poll):
            now, current = time.monotonic(), (self.progress(), self.ticks)
            if current != last:
                last, changed, self._warm = current, now, True
            if self._parent is not None and os.getppid() != self._parent:
                self._orphaned()
            if self._preemption is not None and self._signalled is None:
                signalled = self._preemption.poll()
                if signalled is not None:
                    self._signalled = (now, signalled)
            if self._signalled is not None and self._phase not in ("checkpoint", "final save"):
                at, name = self._signalled
                stalled = now - max(changed, at, self._since)
                if stalled > self.timeouts.collective and not self._stop.is_set():
                    self._fire(stalled, current[0], f"{name} arrived {now - at:.0f} s ago and found no step "
                                                    f"boundary")
                    return
            if self._warm and _compiling() != compiling:
                compiling = not compiling
                self._count_compiling(1 if compiling else -1)
            bound = self._bound if self._warm else self.timeouts.init
            stalled = now - max(changed, self._since)
            if bound < stalled <= self.timeouts.init and (compiling or self._count_compiling(0) > 0):
                continue  # a recompilation (a new shape) takes a start-up's time, not a step's, on any rank
            if stalled > bound and not self._stop.is_set():
                self._fire(stalled, current[0])
                return

    def _orphaned(self) -> None:
        print(f"launcher: rank {self.rank} on {self.host} (pid {os.getpid()}): its launcher (pid {self._parent}) "
              f"is gone; ending this worker instead of leaving it behind (exit {EXIT_HUNG})",
              file=sys.stderr, flush=True)
        os._exit(EXIT_HUNG)

    def _count_compiling(self, change: int) -> int:
        """How many ranks are compiling (after adding `change`): one store counter, touched only when a rank
        starts or stops compiling, and read only by a rank already past its step bound."""
        if self._group is None:
            return 0
        try:
            previous = self._store.timeout
            self._store.set_timeout(timedelta(seconds=self.timeouts.grace))  # a frozen store host must not
            try:                                                              # hold this thread past the bound
                return self._store.add("compiling", change)
            finally:
                self._store.set_timeout(previous)
        except Exception:  # noqa: BLE001 - an unreachable store: the step bound applies
            return 0

    def _fire(self, stalled: float, position: Any, why: str = "") -> None:
        try:
            culprits, how = self._find_culprits()
        except Exception as err:  # noqa: BLE001 - whatever happens, the job must still end
            culprits, how = [], f"the culprit could not be determined ({type(err).__name__}: {err})"
        healthy = [r for r in range(self.world) if r not in culprits]
        for rank in culprits:
            host, pid = self.peers[rank]
            # A culprit that is alive leaves through its own watchdog; a stopped one cannot.
            if host == self.host and pid != os.getpid() and _is_stopped(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        reporter = healthy[0] if healthy else min(culprits, default=self.rank)
        if self.rank == reporter:
            named = ", ".join(f"rank {r} on {self.peers[r][0]} (pid {self.peers[r][1]})" for r in culprits)
            bound = self.timeouts.collective if why else self._bound
            line = (f"launcher: {named or 'no rank could be named'} stopped making progress: no "
                    f"{self._phase} progress for {stalled:.0f} s (bound {bound:g} s, at position {position}"
                    f"{f', evaluation batch {self.ticks}' if self._phase == 'evaluation' else ''}); "
                    f"{why + '; ' if why else ''}{how}; ending the job (exit {EXIT_HUNG})")
            print(line, file=sys.stderr, flush=True)
            fault_file = os.environ.get(FAULT_FILE_ENV)
            if fault_file:
                with contextlib.suppress(OSError):
                    Path(fault_file).write_text(line + "\n")
        os._exit(EXIT_HUNG)

    def _find_culprits(self) -> tuple[list[int], str]:
        if self.world == 1:
            _, _, where = self._main_thread_state()
            return [0], f"it is the only rank; its main thread is at {where}"
        grace = timedelta(seconds=self.timeouts.grace)
        self._store.set_timeout(grace)  # a frozen store host must not hold us for the init timeout
        try:
            dist.monitored_barrier(group=self._group, timeout=grace, wait_all_ranks=True)
            missing = None
        except RuntimeError as err:
            missing = _missing_ranks(str(err), self.rank)
        if missing == []:
            raise RuntimeError("monitored_barrier failed without naming a rank")
        if missing is None:  # every rank is alive: ask where each one's main thread is
            return self._stuck_main_threads()
        if self.rank == 0:
            self._store.set("verdict", json.dumps(missing))
            # Wait (briefly) until the healthy ranks have read it: with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
            # the store lives in this process, and our exit would take it away.
            expected = self.world - 1 - len(missing)
            deadline = time.monotonic() + self.timeouts.grace
            while self._store.add("read", 0) < expected and time.monotonic() < deadline:
                time.sleep(0.05)
            return missing, "it did not reach a monitored barrier that every other rank reached"
        try:
            self._store.wait(["verdict"], grace)
            verdict = json.loads(self._store.get("verdict"))
            self._store.add("read", 1)
            return verdict, "it did not reach a monitored barrier that every other rank reached"
        except Exception:  # noqa: BLE001 - rank 0 (or its host's store) did not answer
            return [0], "rank 0 did not answer the monitored barrier"

    def _stuck_main_threads(self) -> tuple[list[int], str]:
        states: list[Any] = [None] * self.world
        dist.all_gather_object(states, self._main_thread_state(), group=self._group)
        return name_stuck_ranks(states)

    def _main_thread_state(self) -> tuple[bool, bool, str]:
        in_torch, where = _main_thread_location()
        return in_torch, _gpu_busy(self._device), where


def name_stuck_ranks(states: list[tuple[bool, bool, str]]) -> tuple[list[int], str]:
    """The culprits among live ranks that make no progress, from each one's (main thread inside torch, its GPU
    still has work queued, where the main thread is). Waiting inside torch or on the GPU is what a healthy
    rank does while a peer is stuck; a rank doing neither is stuck itself."""
    culprits = [r for r, (in_torch, gpu_busy, _) in enumerate(states) if not (in_torch or gpu_busy)]
    if not culprits:
        return list(range(len(states))), (f"every rank is alive and waiting inside torch or on its GPU "
                                          f"(mismatched collectives, or a GPU kernel that does not end?); "
                                          f"rank 0 is at {states[0][2]}")
    return culprits, "its main thread is not in a collective: " + "; ".join(
        f"rank {r} at {states[r][2]}" for r in culprits)


def _gpu_busy(device: int | None) -> bool:
    """Whether the GPU's default stream still has work queued (cudaStreamQuery: it does not wait)."""
    if device is None:
        return False
    try:
        return not torch.cuda.default_stream(device).query()
    except Exception:  # noqa: BLE001 - a GPU in an error state: say nothing about it
        return False


# Files only torch.compile's compilation runs in (not a compiled graph's execution): dynamo converting a frame,
# inductor compiling a graph (also the backward's, compiled lazily in an autograd thread).
_COMPILER_FILES = tuple(os.path.join(_TORCH_DIR, *p) for p in (("_dynamo", "convert_frame.py"),
                                                                ("_inductor", "compile_fx.py")))


def _compiling() -> bool:
    """Whether some thread of this process is inside torch.compile's compiler."""
    for frame in sys._current_frames().values():
        while frame is not None:
            if frame.f_code.co_filename in _COMPILER_FILES:
                return True
            frame = frame.f_back
    return False


def _missing_ranks(message: str, rank: int) -> list[int]:
    """Ranks a gloo monitored_barrier error names. Rank 0 lists the ranks that did not arrive ("Ranks 1, 3
    failed to pass monitoredBarrier"); the others only see that rank 0 did not answer them."""
    match = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", message)
    if match:
        return [int(r) for r in re.findall(r"\d+", match.group(1))]
    if rank != 0:
        return [0]
    return []


def _is_stopped(pid: int) -> bool:
    """State T (stopped by a signal) or t (stopped by a tracer) in /proc/PID/stat (Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:][:1] in ("T", "t")


def _main_thread_location() -> tuple[bool, str]:
    """(whether the main thread's innermost Python frame is in torch, 'file:line in function')."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return False, "unknown"
    code = frame.f_code
    return code.co_filename.startswith(_TORCH_DIR), f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"


def start_watchdog(progress: Callable[[], Any], timeouts: Timeouts) -> NoWatchdog:
    """The Watchdog, in one process as in many: the bounds hold the same way."""
    return Watchdog(progress, timeouts)
