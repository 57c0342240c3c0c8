"""One run per output folder (launcher.faults.lease): real lease files, real processes, real kills."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from launcher.checkpoint import list_checkpoints, validate
from launcher.config import parse_config
from launcher.errors import EXIT_LEASE_LOST, EXIT_USAGE, LeaseLost, UsageError
from launcher.faults.lease import LEASE_NAME, FolderInUse, claim
from tests.helpers import RECIPE, ROOT, make_env, read_metrics, run, signal_tree, start, wait_for

# Each training step sleeps 50 ms (tests/slurm/slow_model.py), so a run lasts long enough for a second launch.
SLOW = ["--model", "tests.slurm.slow_model:build", "--batch-size", "16", "--lr", "3e-3"]


def test_second_claim_names_the_holder_and_a_released_folder_is_free(tmp_path):
    held = claim(tmp_path)
    with pytest.raises(FolderInUse) as err:
        claim(tmp_path)
    message = str(err.value)
    assert f"pid {os.getpid()} on {socket.gethostname()}" in message and "--force" in message
    assert len(message.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LEASE_NAME, held.claim_file.name])
    held.release()
    assert list(tmp_path.iterdir()) == []
    claim(tmp_path).release()


def _foreign_lease(folder, *, age: float, host: str = "other-node", pid: int = 1, **extra):
    """A lease as another machine's run leaves it, last heartbeat `age` seconds ago."""
    claim_file = folder / f"{LEASE_NAME}.{host}.{pid}.deadbeef"
    claim_file.write_text(json.dumps({"host": host, "pid": pid, "run_id": "deadbeef" * 4, "since": "then",
                                      **extra}))
    os.link(claim_file, folder / LEASE_NAME)
    os.utime(claim_file, (time.time() - age, time.time() - age))


def test_another_hosts_claim_blocks_until_its_heartbeat_is_stale(tmp_path):
    _foreign_lease(tmp_path, age=5)
    with pytest.raises(FolderInUse, match="in use by pid 1 on other-node"):
        claim(tmp_path, stale_seconds=60)
    held = claim(tmp_path, stale_seconds=4)  # the same claim, now older than the bound
    assert held.owned() and not (tmp_path / f"{LEASE_NAME}.other-node.1.deadbeef").exists()
    held.release()


def test_heartbeat_keeps_a_live_claim_fresh(tmp_path):
    held = claim(tmp_path, heartbeat_seconds=0.05)
    old = time.time() - 100
    os.utime(held.claim_file, (old, old))
    assert wait_for(lambda: time.time() - (tmp_path / LEASE_NAME).stat().st_mtime < 5, timeout=5)
    held.release()


def test_dead_process_and_same_slurm_job_take_over_at_once(tmp_path, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _foreign_lease(tmp_path, age=0, host=socket.gethostname(), pid=dead.pid)
    held = claim(tmp_path)  # its pid is gone: no need to wait for the heartbeat to go stale
    held.release()
    _foreign_lease(tmp_path, age=0, slurm_job_id="4242")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the requeued job itself, possibly on another node
    claim(tmp_path).release()


def test_force_breaks_a_live_claim_and_the_old_holder_stops_before_writing(tmp_path, capsys):
    first = claim(tmp_path)
    second = claim(tmp_path, force=True)
    assert "WARNING: --force" in capsys.readouterr().err
    with pytest.raises(LeaseLost, match="taken over by pid"):
        first.check()
    second.check()
    first.release()  # releases nothing of the new holder's
    assert second.owned()
    second.release()


# ---------------------------------------------------------------------------------------------- end to end


def wait_for_lease(out, proc) -> None:
    assert wait_for(lambda: (out / LEASE_NAME).exists(), timeout=120, proc=proc), proc.communicate()[0][-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_double_launch_exits_2_at_once_and_the_first_run_ends_clean(tmp_path, nproc):
    epochs = 3
    args = [*SLOW, "--epochs", str(epochs), "--output-dir", str(tmp_path)]
    if nproc == 2:
        args += ["--batch-size", "8"]  # as many steps per process, so it runs as long
    first = start(args, nproc=nproc)
    try:
        wait_for_lease(tmp_path, first)
        before = sorted(p.name for p in tmp_path.iterdir())
        started = time.monotonic()
        if nproc == 1:  # the recipe itself: `accelerate launch` of one process reports any failure as exit 1
            second = subprocess.run([sys.executable, str(RECIPE), *args], env=make_env(), cwd=ROOT, timeout=120,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        else:
            second = run(args, nproc=nproc, check=False, timeout=120)
        took = time.monotonic() - started
        assert first.poll() is None, "the first run ended before the second launch could collide with it"
        assert second.returncode == (EXIT_USAGE if nproc == 1 else 1), second.stdout[-3000:]
        errors = [line for line in second.stdout.splitlines() if "error:" in line]
        assert len(errors) == 1 and "is in use by pid" in errors[0] and socket.gethostname() in errors[0], errors
        assert len([n for n in os.listdir(tmp_path) if n.startswith(LEASE_NAME)]) == 2  # the holder's two names
        assert set(before) <= {p.name for p in tmp_path.iterdir()}  # nothing of the first run's was touched
        out, _ = first.communicate(timeout=180)
    finally:
        signal_tree(first.pid, signal.SIGKILL)
    assert first.returncode == 0, out[-3000:]
    assert [row["epoch"] for row in read_metrics(tmp_path)] == list(range(1, epochs + 1))
    assert not (tmp_path / LEASE_NAME).exists()
    print(f"\nsecond launch ({nproc} process(es)) refused after {took:.1f} s")


@pytest.mark.slow
def test_claim_of_a_sigkilled_run_does_not_block_resume_auto(tmp_path):
    args = [*SLOW, "--epochs", "2", "--save-every-steps", "20", "--output-dir", str(tmp_path)]
    proc = start(args, nproc=2)
    assert wait_for(lambda: list_checkpoints(tmp_path), timeout=120, proc=proc)
    signal_tree(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert (tmp_path / LEASE_NAME).exists(), "the killed run left its claim behind"
    result = run(args, nproc=2)  # --resume auto is the default
    assert "resumed from" in result.stdout
    assert [row["epoch"] for row in read_metrics(tmp_path)] == [1, 2]
    validate(tmp_path / "checkpoints" / list_checkpoints(tmp_path)[-1])


@pytest.mark.slow
def test_force_takes_a_live_folder_over_and_the_old_run_stops_with_its_code(tmp_path):
    common = [*SLOW, "--save-every-steps", "10", "--output-dir", str(tmp_path)]
    # The recipe itself, so that its exit code is seen (accelerate launch turns every failure into 1).
    old = subprocess.Popen([sys.executable, str(RECIPE), *common, "--epochs", "100"], env=make_env(), cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # would run for minutes
    try:
        assert wait_for(lambda: list_checkpoints(tmp_path), timeout=120, proc=old)
        new = run([*common, "--epochs", "1", "--force"], check=False, timeout=180)
        old_out, _ = old.communicate(timeout=120)  # it stops at its next save, not after 100 epochs
    finally:
        signal_tree(old.pid, signal.SIGKILL)
    assert new.returncode == 0, new.stdout[-3000:]
    assert "WARNING: --force: taking output folder" in new.stdout and "resumed from" in new.stdout
    assert old.returncode == EXIT_LEASE_LOST and "classify.py: error: output folder" in old_out, old_out[-3000:]
    assert "was taken over by pid" in old_out and "stops without writing over it" in old_out
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_bad_force_value_is_a_usage_error():
    with pytest.raises(UsageError, match="--force: expected true or false"):
        parse_config(["--force", "maybe"])


def test_force_with_eval_only_is_a_usage_error():
    with pytest.raises(UsageError, match="--force takes over a folder for training; --eval-only claims nothing"):
        parse_config(["--force", "--eval-only", "--resume", "somewhere"])


def test_a_launch_that_fails_after_its_claim_leaves_no_folder_behind(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(RECIPE), "--dataset", str(tmp_path / "nothing"),
                           "--output-dir", str(out)], env=make_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert not out.exists()
