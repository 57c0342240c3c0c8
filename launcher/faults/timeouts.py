"""The two bounds on a stalled job (launcher.faults.watchdog enforces them): plain data, no torch, so that
`launcher submit` checks them without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from launcher.errors import UsageError

# A real GPU job: a training step of a large model takes seconds, an NCCL collective that has not finished
# in 5 minutes will not (NCCL's own default is 10). Start-up, validation and checkpoint writes get 30
# minutes, torch's gloo default: a dataset prepared on the main process first, a compile, a big save.
DEFAULT_COLLECTIVE_TIMEOUT = 300.0
DEFAULT_INIT_TIMEOUT = 1800.0


@dataclass(frozen=True)
class Timeouts:
    """How long a training collective (a step) and start-up / validation / checkpointing may take."""

    collective: float = DEFAULT_COLLECTIVE_TIMEOUT
    init: float = DEFAULT_INIT_TIMEOUT

    def __post_init__(self) -> None:
        check_timeouts(self.collective, self.init)

    @property
    def grace(self) -> float:
        """How long the ranks wait for each other once the watchdog fired (they fire a step apart at most)."""
        return min(max(self.collective / 4, 2.0), 30.0)

    @property
    def poll(self) -> float:
        return min(1.0, self.collective / 10)


def check_timeouts(collective: float, init: float) -> None:
    """One line naming the flag, as every bad-input check here (UsageError)."""
    if not collective > 0:
        raise UsageError(f"--collective-timeout must be a positive number of seconds (got {collective})")
    if not init > 0:
        raise UsageError(f"--init-timeout must be a positive number of seconds (got {init})")
    if init < collective:
        raise UsageError(f"--init-timeout ({init:g}) must be at least --collective-timeout "
                         f"({collective:g}): start-up and checkpoint writes take longer than a step")


