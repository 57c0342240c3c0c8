"""How the suite is spread over pytest-xdist workers (`pytest -n 2 --dist loadgroup`, as .ci/run runs it).

Most end-to-end tests start `accelerate launch` processes and then wait on them (a watchdog timeout, a
SLURM scheduler, a signal's effect), so one pytest process leaves about half of a 2-core machine idle;
two workers fill it. Each test module stays on one worker, so its module-scoped fixtures (a trained
baseline, an uninterrupted reference run) are built once. Every test that submits to the local SLURM
cluster shares one group: two jobs at once would queue behind each other on its two nodes and turn
the timing of a fault into the timing of the queue.
"""

from __future__ import annotations

import pytest

from tests.slurm_jobs import baseline, cluster  # noqa: F401 - session fixtures, registered here to be built once


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        group = "slurm" if item.get_closest_marker("slurm") else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))
