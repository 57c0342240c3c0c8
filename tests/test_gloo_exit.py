"""launcher.faults.gloo_exit: the exit handler that lets gloo's worker threads settle before Python finalizes.

The abort it prevents is a race (about 1 run in 10 of a 3-process job on 2 loaded cores, see the module);
these tests pin what the fix depends on: the handler is registered by make_accelerator, it finds torch's
gloo worker threads by name in a real 2-process gloo group (a renamed thread would silently disable it),
and it returns once they are idle.
"""

from __future__ import annotations

import atexit
import re

from launcher.faults import gloo_exit
from tests.helpers import make_env, run

JOB = """
import sys

import torch
from launcher.faults import gloo_exit
from launcher.loop.accelerator import make_accelerator

accelerator = make_accelerator()
model = accelerator.prepare(torch.nn.Linear(2, 2))
model(torch.ones(4, 2)).sum().backward()  # DDP's gradient all-reduce runs on a gloo worker
accelerator.wait_for_everyone()
workers = len(gloo_exit._worker_states())
# One write per line: two ranks share the pipe, and print() writes the newline separately.
sys.stdout.write(f"rank {accelerator.process_index}: {workers} gloo workers, registered {gloo_exit._registered}, "
                 f"settled {gloo_exit.wait_for_idle_workers()}\\n")
sys.stdout.flush()
accelerator.end_training()
"""


def test_the_handler_finds_the_gloo_workers_of_a_two_process_group_and_returns_once_they_settle(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    out = run([], nproc=2, script=script, env=make_env(OMP_NUM_THREADS="1")).stdout
    lines = re.findall(r"rank (\d): (\d+) gloo workers, registered (True|False), settled (True|False)", out)
    assert sorted(rank for rank, *_ in lines) == ["0", "1"], out[-3000:]
    for _, workers, registered, settled in lines:
        assert int(workers) >= 2 and registered == "True" and settled == "True", out[-3000:]


def test_registered_once_and_without_gloo_returns_at_once():
    before = atexit._ncallbacks()
    gloo_exit.settle_gloo_workers_at_exit()
    gloo_exit.settle_gloo_workers_at_exit()
    assert atexit._ncallbacks() - before <= 1
    assert gloo_exit._worker_states() == []  # this pytest process has no process group
    assert gloo_exit.wait_for_idle_workers(limit_s=1.0)
