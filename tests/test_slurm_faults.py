"""Faults on the real two-node SLURM cluster (tests/slurm/cluster.sh): a stopped rank, a killed rank with restarts.

Uses the cluster, the job helpers and the uninterrupted 2-node baseline of tests/slurm_jobs.py, which
tests/test_slurm_cluster.py shares.
"""

from __future__ import annotations

import re
import signal
import time

import pytest

from launcher.data.sampling import RECORD_ENV
from launcher.errors import EXIT_HUNG
from tests.helpers import assert_same_weights, comparable, final_weights, read_metrics, wait_for
from tests.slurm_jobs import (
    processes_of_job,
    read_log,
    submit,
    wait_job,
    wait_path,
)

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

COLLECTIVE_TIMEOUT = 5
# Watchdog poll and grace (about 3 s), the batch shell's fault watcher (1 s poll, then scancel
# --signal=KILL of the job step: it does not wait for KillWait, 20 s here), the teardown on a loaded machine.
BOUND = COLLECTIVE_TIMEOUT + 3 + 1 + 8


def training_worker(job_id: str, rank: int):
    workers = [p for p in processes_of_job(job_id)
               if p.environ().get("RANK") == str(rank) and "classify.py" in " ".join(p.cmdline())
               and "accelerate" not in " ".join(p.cmdline()[:3])]
    assert len(workers) == 1, [(p.pid, p.cmdline()) for p in workers]
    return workers[0]


def test_stopped_rank_fails_the_job_within_the_bound_naming_it(
        cluster, tmp_path):
    run, samples = tmp_path / "run", tmp_path / "samples"
    options = ["--nodes", "2", "--collective-timeout", str(COLLECTIVE_TIMEOUT), "--init-timeout", "120",
               "--env", f"{RECORD_ENV}={samples}", "--output-dir", str(run)]
    job_id, _ = submit(cluster, options)
    log = run / "slurm" / f"classify-{job_id}.out"
    wait_path(run / "checkpoints" / "step-00000005" / "manifest.json", 300, cluster, job_id)  # may queue
    # Stop rank 1 in a training step (bound: --collective-timeout), not while the ranks still finish that
    # checkpoint (a write's bound is --init-timeout): its sampler records each batch it hands out, and it
    # asks for the next one only once the step before and its save are done.
    recorded = tmp_path / "samples.rank1"
    batches = lambda: len(recorded.read_text().splitlines())  # noqa: E731
    seen = batches()
    assert wait_for(lambda: batches() > seen, timeout=60), read_log(log)[-4000:]
    victim = training_worker(job_id, 1)
    assert victim.environ()["SLURMD_NODENAME"] == "n2"
    victim.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    [record] = wait_job(cluster, job_id, BOUND + 60, log)
    seconds = time.monotonic() - stopped
    text = read_log(log)
    print(f"\nSIGSTOP of rank 1 (n2) in job {job_id}: {record['JobState']} {seconds:.1f} s later")
    assert record["JobState"] == "FAILED" and record["ExitCode"] == f"{EXIT_HUNG}:0", text[-4000:]
    assert seconds < BOUND, text[-4000:]
    assert re.search(rf"launcher: rank 1 on n2 \(pid {victim.pid}\) stopped making progress", text), text[-4000:]
    assert f"launcher: job failed: a rank stopped making progress (exit {EXIT_HUNG})" in text
    assert "launcher: job failed: srun exited" not in text
    deadline = time.monotonic() + 10  # helpers such as wandb's system monitor notice their parent gone
    while processes_of_job(job_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_of_job(job_id) == []  # the stopped process ended too, nothing is left on any node
    # Nothing lost: the newest checkpoint is complete (tests/test_faults_hang.py resumes from one exactly).
    assert (run / "checkpoints" / "step-00000005" / "manifest.json").exists() and not (run / "final").exists()


def test_killed_rank_is_restarted_inside_the_allocation_and_the_job_ends_bit_identical(
        cluster, baseline, tmp_path):
    run = tmp_path / "run"
    job_id, _ = submit(cluster, ["--nodes", "2", "--max-restarts", "1", "--output-dir", str(run)])
    log = run / "slurm" / f"classify-{job_id}.out"
    wait_path(run / "checkpoints" / "step-00000005" / "manifest.json", 300, cluster, job_id)  # may queue
    training_worker(job_id, 1).send_signal(signal.SIGKILL)
    killed = time.monotonic()
    [record] = wait_job(cluster, job_id, 240, log)
    text = read_log(log)
    print(f"\nSIGKILL of rank 1 (n2) in job {job_id} with --max-restarts 1: {record['JobState']} "
          f"{time.monotonic() - killed:.1f} s later")
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", text[-4000:]
    assert record["Restarts"] == "0"  # restarted by torchrun inside the allocation, not requeued by SLURM
    assert "resumed from" in text
    assert_same_weights(final_weights(run), final_weights(baseline["dir"]))
    assert comparable(read_metrics(run)) == comparable(read_metrics(baseline["dir"]))
