"""Exit codes and the one exception type that turns bad input into a one-line message."""

EXIT_USAGE = 2
# EX_TEMPFAIL from sysexits.h: "temporary failure, retry later". A preempted run saved a checkpoint
# and exits with this code so that a wrapper (the SLURM script, a user's loop) knows to start it again.
EXIT_PREEMPTED = 75
# A non-finite training or validation loss stopped the run (see launcher.loop.Diverged): retrying the same
# command would diverge again, so it is neither a crash (1) nor a preemption (75).
EXIT_DIVERGED = 3


class UsageError(Exception):
    """Bad input from the user. Entry points print it as one line (no traceback) and exit with EXIT_USAGE."""
