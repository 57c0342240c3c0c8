"""Interrupted and resumed runs end bit-for-bit where uninterrupted runs end (real processes, real kills)."""

import json
import signal
import subprocess
import sys

import pytest

from launcher.checkpoint import FAULT_ENV, list_checkpoints
from launcher.errors import EXIT_PREEMPTED
from tests.helpers import (
    RECIPE,
    ROOT,
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

# 1438 digits / 16 per process: 90 steps an epoch on 1 process, 45 on 2; a checkpoint every 7 steps, so
# kills land mid-epoch, at epoch ends and in between. Dropout makes the RNG streams matter.
ARGS = ["--epochs", "3", "--batch-size", "16", "--save-every-steps", "7", "--keep-last", "2", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    runs = {}
    for nproc in (1, 2):
        out = tmp_path_factory.mktemp(f"clean{nproc}")
        run([*ARGS, "--output-dir", str(out)], nproc=nproc)
        runs[nproc] = out
    return runs


def newest_step(out) -> int:
    names = list_checkpoints(out)
    return int(names[-1].split("-")[1]) if names else -1


def interrupt_after_new_checkpoint(out, nproc, sig, *, extra_delay=0.0, extra=()):
    """Start (or resume) the run, wait for a checkpoint newer than the one it starts from, signal the
    whole process tree. Returns the process's exit code and the step it had reached."""
    before = newest_step(out)
    proc = start([*ARGS, *extra, "--output-dir", str(out)], nproc=nproc)
    reached = wait_for(lambda: newest_step(out) > before, timeout=120, proc=proc)
    if extra_delay:
        wait_for(lambda: False, timeout=extra_delay, proc=proc)
    signal_tree(proc.pid, sig)
    output, _ = proc.communicate(timeout=120)
    assert reached, output[-3000:]
    return proc.returncode, output


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_several_times_then_resume_is_bit_identical(uninterrupted, tmp_path, nproc):
    for delay in (0.0, 0.15, 0.3):
        code, output = interrupt_after_new_checkpoint(tmp_path, nproc, signal.SIGKILL, extra_delay=delay)
        assert code != 0, "the run finished before it could be interrupted"
    result = run([*ARGS, "--output-dir", str(tmp_path)], nproc=nproc)
    assert "resumed from" in result.stdout
    assert_same_weights(final_weights(tmp_path), final_weights(uninterrupted[nproc]))
    assert comparable(read_metrics(tmp_path)) == comparable(read_metrics(uninterrupted[nproc]))


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_with_workers_then_resume_with_other_workers_is_bit_identical(uninterrupted, tmp_path, nproc):
    """Nothing depends on DataLoader workers: killed twice with 2 workers, resumed with 1, the run ends
    exactly where the uninterrupted run without workers ends (the loaders' own generators give the workers
    their seeds; the global RNG stream, i.e. dropout, does not depend on when workers start)."""
    for delay in (0.0, 0.2):
        code, output = interrupt_after_new_checkpoint(tmp_path, nproc, signal.SIGKILL, extra_delay=delay,
                                                      extra=["--num-workers", "2"])
        assert code != 0, "the run finished before it could be interrupted"
    result = run([*ARGS, "--num-workers", "1", "--output-dir", str(tmp_path)], nproc=nproc)
    assert "resumed from" in result.stdout
    assert_same_weights(final_weights(tmp_path), final_weights(uninterrupted[nproc]))
    assert comparable(read_metrics(tmp_path)) == comparable(read_metrics(uninterrupted[nproc]))


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_saves_together_and_resumes_bit_identical(uninterrupted, tmp_path, nproc):
    code, output = interrupt_after_new_checkpoint(tmp_path, nproc, signal.SIGTERM, extra_delay=0.1)
    newest = tmp_path / "checkpoints" / list_checkpoints(tmp_path)[-1]
    assert json.loads((newest / "manifest.json").read_text())["reason"] == "preempted", output[-3000:]
    run([*ARGS, "--output-dir", str(tmp_path)], nproc=nproc)
    assert_same_weights(final_weights(tmp_path), final_weights(uninterrupted[nproc]))
    assert comparable(read_metrics(tmp_path)) == comparable(read_metrics(uninterrupted[nproc]))


def test_preempted_process_exits_with_documented_code(tmp_path):
    """Without a launcher in between, the exit code itself says 'preempted, checkpoint saved'."""
    proc = subprocess.Popen([sys.executable, str(RECIPE), *ARGS, "--output-dir", str(tmp_path)], env=make_env(),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert wait_for(lambda: newest_step(tmp_path) > 0, timeout=120, proc=proc)
    proc.send_signal(signal.SIGUSR1)
    proc.send_signal(signal.SIGUSR1)  # a second signal during the save changes nothing
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, output[-3000:]


def test_kill_during_checkpoint_write_resumes_from_previous(uninterrupted, tmp_path):
    """The process dies halfway through writing step 14: that folder never becomes a checkpoint."""
    env = make_env(**{FAULT_ENV: "14"})
    proc = start([*ARGS, "--output-dir", str(tmp_path)], env=env)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert list_checkpoints(tmp_path) == ["step-00000007"]
    assert list((tmp_path / "checkpoints").glob(".tmp-step-00000014-*")), "the half-written folder is there"
    result = run([*ARGS, "--output-dir", str(tmp_path)])
    assert "resumed from" in result.stdout and "step-00000007" in result.stdout
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert_same_weights(final_weights(tmp_path), final_weights(uninterrupted[1]))
    assert comparable(read_metrics(tmp_path)) == comparable(read_metrics(uninterrupted[1]))
