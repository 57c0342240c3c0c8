"""A clean exit for a process that used gloo: its worker threads settle before Python finalizes.

Gloo runs each collective on a worker thread of its process group (`pt_gloo_runloop`). The worker drops
its reference to a finished collective a moment after the caller's `wait()` returns, and when that
collective held tensors Python created, dropping them takes the GIL. Should the main thread reach
interpreter finalization first (the end of a script, just after its last barrier), Python before 3.14 ends
the worker with `pthread_exit` inside a C++ destructor and the process aborts: "terminate called without
an active exception", SIGABRT, exit -6 after a run that finished. Measured: 7 of 80 runs of a 3-process
gloo job on 2 loaded cores; gdb shows the worker in `~AsyncBarrierWork` -> `decref_pyobject` -> `take_gil`.
`destroy_process_group` does not stop the workers (a DDP-wrapped model keeps its group alive until exit).

So an atexit handler, which runs before finalization while a worker can still take the GIL, waits with the
GIL released until every gloo worker of this process is blocked (idle, or waiting on a peer) for a few
polls in a row: a few milliseconds at a normal exit, at most `LIMIT_S`.

The recipes leave by `os._exit` (launcher.loop.launch.exit_now), which skips finalization, and with it the
exit handlers: `run_exit_handlers` runs them first, so that what they clean up still is (wandb's temp folders
and its service, the folder's claim, tempfile's folders, the wait above).
"""

from __future__ import annotations

import atexit
import os
import time

WORKER = "pt_gloo_runloop"  # the name torch gives gloo's worker threads
POLL_S = 0.002
QUIET_POLLS = 3  # consecutive polls with every worker blocked
LIMIT_S = 2.0

_registered = False


def settle_gloo_workers_at_exit() -> None:
    """Register the exit handler once per process (before the process group exists, so that it runs after
    the handlers torch and accelerate register: atexit runs the last registered first). make_accelerator and
    start_process_group call it, and so do fit and evaluate (for an Accelerator built elsewhere, the handler
    then runs before torch's and accelerate's, which issue no collectives); code that calls
    `init_process_group` itself should call it first."""
    global _registered
    if not _registered and os.path.isdir("/proc/self/task"):  # Linux; elsewhere there is nothing to read
        atexit.register(wait_for_idle_workers)
        _registered = True


def wait_for_idle_workers(limit_s: float = LIMIT_S) -> bool:
    """Sleep (the GIL released) until no gloo worker is running or runnable; whether they settled in time.
    Returns at once in a process without gloo workers."""
    if not _worker_states():
        return True
    deadline, quiet = time.monotonic() + limit_s, 0
    while quiet < QUIET_POLLS:
        if time.monotonic() > deadline:
            return False
        quiet = quiet + 1 if all(state != "R" for state in _worker_states()) else 0
        time.sleep(POLL_S)
    return True


def _worker_states() -> list[str]:
    """The scheduler state (R running or runnable, S/D blocked) of each gloo worker thread of this process."""
    states = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # the thread ended between listing and reading
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        if name == WORKER:
            states.append(stat[stat.rindex(")") + 2])
    return states


def run_exit_handlers() -> None:
    """Run the atexit handlers now, as a normal interpreter exit would before it finalizes (before `os._exit`).

    Each runs once (atexit forgets them after this), in the usual order, last registered first; one that
    raises is reported by atexit ("Exception ignored in atexit callback") and the rest still run, so a
    failing cleanup never stops the others or changes the exit code."""
    try:
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001 - a Ctrl-C here must not turn a finished run into a traceback
        pass
