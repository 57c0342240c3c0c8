"""A rank that stops making progress ends the job within a bound naming it; a rank that dies is restarted.

Real `accelerate launch` runs of the recipe on two gloo processes: one worker is stopped with SIGSTOP (a
frozen process, as a node that hangs or a process stuck in the kernel) or killed with SIGKILL mid-epoch.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time

import psutil
import pytest

from launcher.checkpoint import list_checkpoints
from launcher.data.sampling import RECORD_ENV
from launcher.errors import EXIT_HUNG, EXIT_PREEMPTED, EXIT_USAGE
from tests.helpers import (
    assert_same_weights,
    comparable,
    final_weights,
    make_env,
    read_metrics,
    run,
    signal_tree,
    start,
    wait_for,
)

pytestmark = pytest.mark.slow

# Each training step sleeps 50 ms (tests/slurm/slow_model.py), so a signal lands mid-epoch: 45 steps an
# epoch on two processes, a checkpoint every 5.
ARGS = ["--model", "tests.slurm.slow_model:build", "--epochs", "3", "--batch-size", "16", "--save-every-steps", "5",
        "--keep-last", "100"]
COLLECTIVE_TIMEOUT = 5
TIMEOUTS = ["--collective-timeout", str(COLLECTIVE_TIMEOUT), "--init-timeout", "60"]
# Poll (0.5 s) + the ranks' grace to meet at the monitored barrier (2 s) + torchrun's teardown, on a
# loaded 2-core machine (measured 3-8 s over the timeout at load average 10-12).
GRACE = 15


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    run([*ARGS, "--output-dir", str(out)], nproc=2)
    return out


def worker(launcher: psutil.Process, rank: int) -> psutil.Process:
    """The training process of `rank` among the launcher's descendants (torchrun's children)."""
    for child in launcher.children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "classify.py" in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            pass
    raise AssertionError(f"no worker of rank {rank}")


def finish(proc, timeout: float) -> str:
    """The launcher's output once it exits; on a timeout, kill its whole tree and fail."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        signal_tree(proc.pid, signal.SIGKILL)
        raise AssertionError(f"still running after {timeout} s:\n{proc.communicate()[0][-4000:]}") from None


def start_and_wait_for_checkpoint(out, extra=(), launch_extra=(), env=None):
    proc = start([*ARGS, *TIMEOUTS, *extra, "--output-dir", str(out)], nproc=2, extra=list(launch_extra), env=env)
    if not wait_for(lambda: len(list_checkpoints(out)) >= 2, timeout=120, proc=proc):
        finish(proc, 0.1)
    return proc


def test_stopped_rank_ends_the_job_within_the_bound_naming_it_and_resume_is_exact(reference, tmp_path):
    samples = tmp_path.parent / f"{tmp_path.name}-samples"
    proc = start_and_wait_for_checkpoint(tmp_path, env=make_env(**{RECORD_ENV: str(samples)}))
    # Stop rank 1 in a training step, whose bound is --collective-timeout, not while the ranks still finish
    # the checkpoint just seen (a write's bound is --init-timeout): its sampler records each batch it hands
    # out, and a new batch is asked for only once the previous step and its save are done.
    recorded = samples.parent / f"{samples.name}.rank1"
    batches = lambda: len(recorded.read_text().splitlines())  # noqa: E731
    seen = batches()
    assert wait_for(lambda: batches() > seen, timeout=60, proc=proc), finish(proc, 0.1)
    victim = worker(psutil.Process(proc.pid), 1)
    victim.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    output = finish(proc, COLLECTIVE_TIMEOUT + GRACE + 60)
    seconds = time.monotonic() - stopped
    print(f"\nSIGSTOP of rank 1 -> accelerate launch exited {proc.returncode} after {seconds:.1f} s")
    assert proc.returncode not in (0, EXIT_USAGE, EXIT_PREEMPTED), output[-3000:]
    assert seconds < COLLECTIVE_TIMEOUT + GRACE, output[-3000:]
    # One line names the stopped rank, its host and pid; torchrun's summary shows the live rank's code.
    [line] = [line for line in output.splitlines() if "stopped making progress" in line]
    assert re.search(rf"launcher: rank 1 on \S+ \(pid {victim.pid}\) stopped making progress", line), line
    assert f"exitcode  : {EXIT_HUNG}" in output
    assert not psutil.pid_exists(victim.pid) or victim.status() == psutil.STATUS_ZOMBIE  # ended too
    # The newest complete checkpoint resumes to the uninterrupted run's result, bit for bit.
    assert not (tmp_path / "final").exists()
    result = run([*ARGS, *TIMEOUTS, "--output-dir", str(tmp_path)], nproc=2)
    assert "resumed from" in result.stdout
    assert_same_weights(final_weights(tmp_path), final_weights(reference))
    assert comparable(read_metrics(tmp_path)) == comparable(read_metrics(reference))


def test_rank_stuck_in_user_code_is_named_with_where_it_is(tmp_path):
    # Rank 1's forward pass blocks at its 8th step: alive, but its main thread is outside torch.
    args = ["--model", "tests.stuck_model:build", "--epochs", "1", "--batch-size", "16", *TIMEOUTS,
            "--output-dir", str(tmp_path)]
    started = time.monotonic()
    proc = start(args, nproc=2, env=make_env(LAUNCHER_TEST_STUCK="1:8"))
    output = finish(proc, 120)
    assert proc.returncode not in (0, EXIT_USAGE, EXIT_PREEMPTED), output[-3000:]
    [line] = [line for line in output.splitlines() if "stopped making progress" in line]
    assert re.search(r"launcher: rank 1 on \S+ \(pid \d+\) stopped making progress", line), line
    assert "its main thread is not in a collective: rank 1 at " in line and "stuck_model.py" in line, line
    assert f"exitcode  : {EXIT_HUNG}" in output
    print(f"\nrank stuck in user code: job ended {time.monotonic() - started:.1f} s after its start")


def test_one_process_whose_step_never_returns_ends_within_the_bound(tmp_path):
    # No process group (cpu.yaml, as single_gpu.yaml): the bound holds all the same.
    args = ["--model", "tests.stuck_model:build", "--epochs", "1", "--batch-size", "16", *TIMEOUTS,
            "--output-dir", str(tmp_path)]
    proc = start(args, nproc=1, env=make_env(LAUNCHER_TEST_STUCK="0:8"))
    assert wait_for(lambda: (tmp_path / "config.json").exists(), timeout=120, proc=proc), finish(proc, 0.1)
    started = time.monotonic()
    output = finish(proc, 120)
    seconds = time.monotonic() - started
    print(f"\none stuck process: ended {seconds:.1f} s after its config was written")
    assert proc.returncode not in (0, EXIT_USAGE, EXIT_PREEMPTED), output[-3000:]
    assert f"exit status {EXIT_HUNG}" in output, output[-3000:]  # the recipe's own; accelerate launch says 1
    assert seconds < COLLECTIVE_TIMEOUT + GRACE + 10, output[-3000:]  # + the steps before the 8th
    # accelerate's simple launcher repeats the child's stderr in its own error: the same line, twice.
    [line] = {line for line in output.splitlines() if "stopped making progress" in line}
    assert re.search(r"launcher: rank 0 on \S+ \(pid \d+\) stopped making progress", line), line
    assert "it is the only rank; its main thread is at " in line and "stuck_model.py" in line, line


def test_killed_rank_is_restarted_by_torchrun_and_ends_bit_identical(reference, tmp_path):
    proc = start_and_wait_for_checkpoint(tmp_path, launch_extra=["--max_restarts", "1"])
    victim = worker(psutil.Process(proc.pid), 1)
    victim.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    output = finish(proc, 240)
    print(f"\nSIGKILL of rank 1 with --max_restarts 1 -> completed {time.monotonic() - killed:.1f} s later")
    assert proc.returncode == 0, output[-4000:]
    assert output.count("resumed from") == 1, output[-4000:]  # printed by rank 0 of the restarted workers
    assert_same_weights(final_weights(tmp_path), final_weights(reference))
    assert comparable(read_metrics(tmp_path)) == comparable(read_metrics(reference))


@pytest.mark.parametrize("flags, message", [
    (["--collective-timeout", "0"], "--collective-timeout must be a positive number of seconds (got 0.0)"),
    (["--init-timeout", "-1"], "--init-timeout must be a positive number of seconds (got -1.0)"),
    (["--collective-timeout", "20", "--init-timeout", "10"], "--init-timeout (10) must be at least "
                                                              "--collective-timeout (20): start-up and checkpoint "
                                                              "writes take longer than a step"),
])
def test_bad_timeouts_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, flags, message):
    from recipes.classify import main  # in-process: the checks run before anything starts

    assert main([*flags, "--output-dir", str(tmp_path / "run")]) == EXIT_USAGE
    assert capsys.readouterr().err.splitlines() == [f"classify.py: error: {message}"]
    assert not (tmp_path / "run").exists()
