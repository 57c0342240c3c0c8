"""Exit codes and the one exception type that turns bad input into a one-line message."""

EXIT_USAGE = 2
# EX_TEMPFAIL from sysexits.h: "temporary failure, retry later". A preempted run saved a checkpoint
# and exits with this code so that a wrapper (the SLURM script, a user's loop) knows to start it again.
EXIT_PREEMPTED = 75
# A rank stopped making progress (launcher.watchdog): the live ranks leave with this code, so that a
# hang is told apart from a crash (1), bad input (2) and a preemption (75). SLURM shows it as 76:0.
EXIT_HUNG = 76


class UsageError(Exception):
    """Bad input from the user. Entry points print it as one line (no traceback) and exit with EXIT_USAGE."""
