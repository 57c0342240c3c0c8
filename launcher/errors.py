"""Exit codes and the exception types that end a run with a one-line message instead of a traceback."""

EXIT_USAGE = 2
# EX_CANTCREAT from sysexits.h: another run took the output folder over while this one was running (a
# `--force`d launch, or a lease broken as stale). This run stops before writing anything over it.
EXIT_LEASE_LOST = 73
# EX_IOERR from sysexits.h: a checkpoint, metrics line or final/ could not be written (disk full, I/O or
# permission error). Every earlier checkpoint is intact; free the space and run again with --resume auto.
EXIT_WRITE_FAILED = 74
# EX_TEMPFAIL from sysexits.h: "temporary failure, retry later". A preempted run saved a checkpoint
# and exits with this code so that a wrapper (the SLURM script, a user's loop) knows to start it again.
EXIT_PREEMPTED = 75
# A non-finite training or validation loss stopped the run (see launcher.loop.Diverged): retrying the same
# command would diverge again, so it is neither a crash (1) nor a preemption (75).
EXIT_DIVERGED = 3
# A rank stopped making progress (launcher.faults.watchdog): the live ranks leave with this code, so that a
# hang is told apart from a crash (1), bad input (2) and a preemption (75). SLURM shows it as 76:0.
EXIT_HUNG = 76


class UsageError(Exception):
    """Bad input from the user. Entry points print it as one line (no traceback) and exit with EXIT_USAGE."""


class RunStopped(Exception):
    """A fault that ends the run on every rank at once; entry points print it as one line, exit `exit_code`."""

    exit_code = 1


class WriteFailed(RunStopped):
    """An output could not be written on some rank; every rank raises it together after the failed write."""

    exit_code = EXIT_WRITE_FAILED


class LeaseLost(RunStopped):
    """Another run now holds the output folder; this one stops before it overwrites anything of it."""

    exit_code = EXIT_LEASE_LOST
