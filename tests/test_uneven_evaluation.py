"""Validation, evaluation and prediction on shares that do not divide evenly, and their bounds.

Under FSDP2 every forward pass all-gathers each layer's parameters, so a rank with one validation batch fewer
than its peers left them waiting in that all-gather forever (seen with recipes/lm.py on 2 and 3 processes).
Evaluation loaders now pad every share to the batch size with samples that are never counted
(launcher.data.sampling), evaluation batches are bounded by the watchdog like training steps, a SIGTERM that
finds no step boundary ends the job anyway, and workers whose launcher is gone end themselves.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import psutil
import pytest

from launcher.errors import EXIT_HUNG, EXIT_PREEMPTED, EXIT_USAGE
from tests.helpers import ROOT, make_env, read_metrics, run, start, wait_for
from tests.test_faults_hang import finish

pytestmark = pytest.mark.slow

JOB = ROOT / "tests" / "uneven_eval_job.py"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("one")
    run([str(out)], 1, script=JOB, timeout=180)
    return json.loads((out / "results.json").read_text())["results"]


@pytest.mark.parametrize("config, nproc", [("cpu_fsdp", 2), ("cpu_fsdp", 3), ("cpu_ddp", 2), ("cpu_ddp", 3)])
def test_evaluate_and_predict_on_every_remainder_match_one_process(one_process, tmp_path, config, nproc):
    """Validation sets of 1, 2, 3, 5 and 12-24 samples (every remainder modulo 2 x 4 and 3 x 4, and sets with
    fewer samples than ranks): no hang (the job's 5 s bound would end it with exit 76), every sample predicted
    once in order, each prediction bit for bit what one process predicts, and the metrics one process gives
    (to the order of a float64 sum)."""
    run([str(tmp_path)], nproc, script=JOB, config=config, timeout=240)
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert results.keys() == one_process.keys()
    for n, got in results.items():
        want = one_process[n]
        assert got["rows"]["index"] == list(range(int(n))), n
        assert got["rows"] == want["rows"], n  # bitwise: the padded batches keep every forward's shape
        assert got["metrics"]["val_samples"] == int(n)
        for key, value in want["metrics"].items():
            assert got["metrics"][key] == pytest.approx(value, rel=1e-12, abs=1e-12), (n, key)
        # A custom step's summed loss sees only the real samples (its batch is cut): float32 sums of other shapes.
        assert got["summed"]["val_samples"] == int(n)
        assert got["summed"]["val_loss"] == pytest.approx(want["summed"]["val_loss"], rel=1e-6), n


def _corpus(root: Path, val_blocks: int, block: int) -> Path:
    """A byte-level corpus whose validation split is exactly `val_blocks` blocks of `block` tokens."""
    (root / "train").mkdir(parents=True)
    (root / "validation").mkdir()
    words = "every rank runs the same forward passes on the same shapes while padding is never counted".split()
    for i in range(40):
        (root / "train" / f"doc{i:02}.txt").write_text(" ".join(words[(i + j) % len(words)] for j in range(60)))
    # One document of val_blocks x block tokens with its end token: gpt-nano's tokenizer is one token a byte.
    text = (" ".join(words) + " ") * 40
    (root / "validation" / "doc.txt").write_text(text[: val_blocks * block - 1])
    return root


@pytest.mark.parametrize("nproc", [2, 3])
def test_lm_recipe_under_fsdp2_validates_shares_that_leave_a_rank_empty(tmp_path, nproc):
    """The reported deadlock: recipes/lm.py under FSDP2 with validation blocks of batch 2 whose last global
    batch holds one block (7 blocks on 3 processes, 5 on 2): the other ranks have none of it. Ends, and counts
    every validation token once."""
    block, val_blocks = 32, {2: 5, 3: 7}[nproc]
    corpus = _corpus(tmp_path / "corpus", val_blocks, block)
    out = tmp_path / "run"
    run(["--dataset", str(corpus), "--model", "gpt-nano", "--block-size", str(block), "--batch-size", "4",
         "--eval-batch-size", "2", "--epochs", "1", "--sample-tokens", "0", "--wandb-mode", "disabled",
         "--collective-timeout", "20", "--init-timeout", "120", "--output-dir", str(out)],
        nproc, script=ROOT / "recipes" / "lm.py", config="cpu_fsdp", timeout=300)
    info = json.loads((out / "config.json").read_text())
    assert info["run_info"]["val_blocks"] == val_blocks, info["run_info"]
    assert val_blocks % (2 * nproc) < nproc  # the premise: some rank's share of the last batch is empty
    [row] = read_metrics(out)
    assert row["val_tokens"] == val_blocks * (block - 1)


@pytest.mark.parametrize("nproc, eval_batch", [(2, 179), (3, 119)])
def test_classify_recipe_under_fsdp2_validates_shares_that_leave_a_rank_empty(tmp_path, nproc, eval_batch):
    """The digits' 359 validation samples in global batches of 358 (2 x 179: the last holds 1 sample, rank 1
    none of it) or 357 (3 x 119: the last holds 2, rank 2 none): the run ends, every sample counted once."""
    out = tmp_path / "run"
    run(["--epochs", "1", "--eval-batch-size", str(eval_batch), "--wandb-mode", "disabled",
         "--collective-timeout", "20", "--init-timeout", "120", "--output-dir", str(out)],
        nproc, config="cpu_fsdp", timeout=300)
    [row] = read_metrics(out)
    assert row["val_samples"] == 359 and 359 % (nproc * eval_batch) < nproc


# ---------------------------------------------------------------------------------------------------------
# Bounds: a hung validation ends within the step bound; a signal that finds no step boundary ends the job

STUCK = ["--model", "tests.stuck_model:build", "--epochs", "1", "--batch-size", "16", "--wandb-mode", "disabled"]


def _workers(launcher: psutil.Process) -> list[psutil.Process]:
    return [c for c in launcher.children(recursive=True) if "classify.py" in " ".join(c.cmdline())]


def test_a_rank_stuck_in_validation_ends_the_job_within_the_step_bound(tmp_path):
    """Validation used to be bounded by the init timeout (30 minutes by default); each of its batches now has a
    step's bound, and the line says the job stopped in evaluation. (Evaluation forward 1 is the recipe's
    shape check; forward 2 the first validation batch.)"""
    marker = tmp_path / "stuck"
    proc = start([*STUCK, "--collective-timeout", "5", "--init-timeout", "300", "--output-dir", str(tmp_path / "run")],
                 nproc=2, env=make_env(LAUNCHER_TEST_STUCK="1:v2", LAUNCHER_TEST_STUCK_FILE=str(marker)))
    assert wait_for(marker.exists, timeout=180, proc=proc), finish(proc, 0.1)
    started = time.monotonic()
    output = finish(proc, 120)
    seconds = time.monotonic() - started
    print(f"\nrank stuck in validation: the job ended {seconds:.1f} s after the hang began")
    assert proc.returncode not in (0, EXIT_USAGE, EXIT_PREEMPTED), output[-3000:]
    [line] = [line for line in output.splitlines() if "stopped making progress" in line]
    assert re.search(r"launcher: rank 1 on \S+ \(pid \d+\) stopped making progress: no evaluation progress", line)
    assert "stuck_model.py" in line, line
    assert seconds < 60, output[-3000:]  # 5 s + the grace to name the rank + torchrun's teardown; not 300 s


def test_sigterm_that_finds_no_step_boundary_ends_the_job_and_a_lost_launcher_ends_its_workers(tmp_path):
    """Rank 1 hangs in its first training step, which still has the start-up bound (300 s here). The workers
    get SIGTERM (as a job step's processes do): the main threads never reach a step boundary, so the watchdog
    ends the job one step bound (5 s) after the signal, naming it. Then a second run hangs the same way and
    its `accelerate launch` is SIGKILLed: the workers, orphaned, end themselves within seconds."""
    marker = tmp_path / "stuck"
    # Training forward 1 is the unused-parameter probe, before fit; forward 2 is the first step.
    env = make_env(LAUNCHER_TEST_STUCK="1:2", LAUNCHER_TEST_STUCK_FILE=str(marker))
    timeouts = ["--collective-timeout", "5", "--init-timeout", "300"]
    proc = start([*STUCK, *timeouts, "--output-dir", str(tmp_path / "a")], nproc=2, env=env)
    assert wait_for(marker.exists, timeout=180, proc=proc), finish(proc, 0.1)
    time.sleep(1)
    for worker in _workers(psutil.Process(proc.pid)):
        worker.send_signal(signal.SIGTERM)
    started = time.monotonic()
    output = finish(proc, 120)
    seconds = time.monotonic() - started
    print(f"\nSIGTERM during a hung validation: the job ended {seconds:.1f} s after the signal")
    assert seconds < 45, output[-3000:]
    [line] = [line for line in output.splitlines() if "stopped making progress" in line]
    assert "SIGTERM arrived" in line and "found no step boundary" in line, line
    assert f"exitcode  : {EXIT_HUNG}" in output

    marker.unlink()
    timeouts = ["--collective-timeout", "300", "--init-timeout", "600"]
    proc = start([*STUCK, *timeouts, "--output-dir", str(tmp_path / "b")], nproc=2, env=env)
    assert wait_for(marker.exists, timeout=180, proc=proc), finish(proc, 0.1)
    workers = _workers(psutil.Process(proc.pid))
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)  # the launcher (torchrun's agent) only: its workers are in sessions of their own
    proc.communicate()
    gone, alive = psutil.wait_procs(workers, timeout=30)
    for worker in alive:
        worker.kill()
    assert not alive, "workers outlived their launcher"
