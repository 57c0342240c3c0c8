"""Experiment tracking. The training loop talks to a `Tracker`; non-main ranks hold a `NullTracker`."""

from __future__ import annotations

from typing import Any, Mapping, Protocol


class Tracker(Protocol):
    """What `fit` calls. Every method is called on every rank; only rank 0's tracker does anything."""

    run_id: str | None

    def log_train(self, step: int, metrics: Mapping[str, float]) -> None:
        """Every `log_every` optimizer steps: loss, lr, samples_per_second, epoch (fractional)."""

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        """Once per completed epoch: the metrics.jsonl row (see launcher.loop)."""

    def finish(self, history: list[Mapping[str, Any]], exit_code: int = 0) -> None:
        """At the end of training, on success and on failure."""


class NullTracker:
    run_id: str | None = None

    def log_train(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        pass

    def finish(self, history: list[Mapping[str, Any]], exit_code: int = 0) -> None:
        pass


def start_tracker(config: Any, *, accelerator: Any, output_dir: Any, run_info: dict,
                  resume_run_id: str | None) -> Tracker:
    """Placeholder until the W&B tracker lands: local logging only."""
    return NullTracker()
