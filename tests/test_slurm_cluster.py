"""`launcher submit` on a real two-node SLURM cluster (tests/slurm/cluster.sh): munge, slurmctld, two slurmd.

Every job here is the real recipe, submitted with the real `launcher submit` and `sbatch`, run by srun on
nodes n1 and n2, signalled with `scancel` and killed with SIGKILL. The cluster starts on first use (about
a second); outside CI a machine that cannot run it (not root, SLURM not installed) skips these tests
with the reason, in CI (CI=true) they fail instead.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from launcher.tracking.wandb_records import find_run_files, read_run_file
from tests.helpers import assert_same_weights, comparable, final_weights, read_metrics
from tests.slurm_jobs import (
    TRAIN,
    checkpoint_reasons,
    finished,
    job_records,
    processes_of_job,
    read_log,
    submit,
    wait_job,
    wait_path,
)

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


def test_two_node_job_completes_with_world_size_2_and_the_weights_of_a_local_run(baseline):
    job_id, run = baseline["job_id"], baseline["dir"]
    [record] = baseline["records"]
    log = read_log(baseline["log"])
    assert record["JobState"] == "COMPLETED", log[-4000:]
    assert record["ExitCode"] == "0:0" and record["Restarts"] == "0"  # every node's task exited 0
    assert record["NumNodes"] == "2" and record["NodeList"] == "n[1-2]"
    # What `launcher submit` printed, and the script it saved next to the log.
    script = run / "slurm" / f"classify-{job_id}.sbatch"
    assert f"  script: {script}" in baseline["printed"] and f"  log:    {baseline['log']}" in baseline["printed"]
    assert script.read_text().startswith("#!/bin/bash\n") and "#SBATCH --nodes=2" in script.read_text()
    assert f"launcher: job {job_id}, restart 0, nodes n[1-2], rendezvous n1:{20000 + int(job_id) % 20000}" in log
    # Two nodes, one process each, one gloo group of two.
    rows = read_metrics(run)
    assert [row["world_size"] for row in rows] == [2, 2, 2]
    info = json.loads((run / "config.json").read_text())["run_info"]
    assert (info["world_size"], info["num_nodes"], info["procs_per_node"]) == (2, 2, 1)
    # Bit-identical to the same run as two processes on one machine without SLURM.
    assert_same_weights(final_weights(run), final_weights(baseline["local"]))
    assert comparable(rows) == comparable(read_metrics(baseline["local"]))


def test_preempted_job_requeues_once_and_ends_bit_identical_in_the_same_wandb_run(cluster, baseline, tmp_path):
    run = tmp_path / "run"
    job_id, _ = submit(cluster, ["--nodes", "2", "--output-dir", str(run)])
    log = run / "slurm" / f"classify-{job_id}.out"
    # Mid-training: once the first periodic checkpoint is complete, signal EVERY process of the job (batch
    # shell, srun, node tasks, accelerate agents, workers) with USR1, as `scancel --full` does.
    wait_path(run / "checkpoints" / "step-00000005" / "manifest.json", 120, cluster, job_id)
    subprocess.run(["scancel", "--signal=USR1", "--full", job_id], env=cluster, check=True)
    signalled = time.monotonic()
    requeued = None
    deadline = time.monotonic() + 240
    while not finished(records := job_records(cluster, job_id)):
        if requeued is None and records[0]["Restarts"] == "1" and records[0]["JobState"] == "RUNNING":
            requeued = time.monotonic()
        assert time.monotonic() < deadline, f"not finished: {records}"
        time.sleep(0.2)
    time.sleep(0.5)
    [record] = job_records(cluster, job_id)
    text = read_log(log)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", text[-4000:]
    assert record["Restarts"] == "1"  # requeued exactly once
    assert text.count("requeueing (restart 1 of at most 3)") == 1
    assert "stopped after SIGUSR1" in text and f"launcher: job {job_id}, restart 1" in text
    # One save for the stop, however many USR1s arrived: a "preempted" checkpoint at the next step boundary
    # (none if the vote fell on an epoch end, whose own checkpoint is the resume point).
    assert checkpoint_reasons(run).count("preempted") <= 1
    # Resumed from there: the result is the uninterrupted job's, bit for bit.
    assert_same_weights(final_weights(run), final_weights(baseline["dir"]))
    assert comparable(read_metrics(run)) == comparable(read_metrics(baseline["dir"]))
    # One W&B run (offline files: one per process start): preempted, then continued by the requeued job.
    parts = [read_run_file(path) for path in find_run_files(run / "wandb")]
    assert [part.run_id for part in parts] == [parts[0].run_id] * 2
    assert (parts[0].exit_code, parts[0].preempting, parts[1].exit_code) == (75, True, 0)
    assert [part.config.get("slurm_restart_count") for part in parts] == [None, 1]
    if requeued is not None:
        print(f"\npreempted job {job_id}: running again {requeued - signalled:.1f} s after the signal")


def test_time_limit_warning_checkpoints_and_max_requeues_bounds_it(cluster, tmp_path):
    # SLURM itself sends USR1 to the batch shell 55 s before the 1-minute limit (--signal=B:USR1@55; SLURM
    # checks every 30 s, so it comes 5-35 s in, maybe before the training listens: the shell sends it again
    # until the training stops). With --max-requeues 0 the job may not come back: it ends with the
    # preemption exit code and says how to continue.
    run = tmp_path / "run"
    train = [*TRAIN[:TRAIN.index("--epochs")], "--epochs", "40", *TRAIN[TRAIN.index("--epochs") + 2:]]
    job_id, _ = submit(cluster, ["--nodes", "2", "--time", "1", "--signal-grace", "55", "--max-requeues", "0",
                                 "--output-dir", str(run)], train)
    log = run / "slurm" / f"classify-{job_id}.out"
    [record] = wait_job(cluster, job_id, 180, log)
    text = read_log(log)
    assert record["JobState"] == "FAILED" and record["ExitCode"] == "75:0", text[-4000:]
    assert record["Restarts"] == "0"
    assert "launcher: USR1 received" in text
    assert "SIGTERM received" not in text  # stopped by the warning, before the time limit itself
    assert "requeued 0 times already (--max-requeues)" in text
    assert checkpoint_reasons(run).count("preempted") <= 1
    assert not (run / "final").exists()
    # The training stopped through its preemption path (exit 75), not by a kill.
    [part] = [read_run_file(path) for path in find_run_files(run / "wandb")]
    assert (part.exit_code, part.preempting) == (75, True)


def test_killed_rank_fails_the_job_promptly_naming_the_node(cluster, tmp_path):
    run = tmp_path / "run"
    train = [*TRAIN[:TRAIN.index("--epochs")], "--epochs", "40", *TRAIN[TRAIN.index("--epochs") + 2:]]
    job_id, _ = submit(cluster, ["--nodes", "2", "--output-dir", str(run)], train)
    log = run / "slurm" / f"classify-{job_id}.out"
    wait_path(run / "checkpoints" / "step-00000005" / "manifest.json", 120, cluster, job_id)
    # The training process of global rank 1 (node n2), not its launcher: a crash of one worker.
    workers = [p for p in processes_of_job(job_id)
               if p.environ().get("RANK") == "1" and "classify.py" in " ".join(p.cmdline())
               and "accelerate" not in " ".join(p.cmdline()[:3])]
    assert len(workers) == 1, [(p.pid, p.cmdline()) for p in workers]
    assert workers[0].environ()["SLURMD_NODENAME"] == "n2"
    workers[0].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    [record] = wait_job(cluster, job_id, 60, log)
    seconds = time.monotonic() - killed
    text = read_log(log)
    assert record["JobState"] == "FAILED" and record["ExitCode"] != "0:0", text[-4000:]
    assert seconds < 60
    assert "launcher: training failed on node n2 (machine rank 1, process rank 1)" in text
    assert "srun: error: n2: task 1: Exited with exit code" in text
    assert "launcher: job failed: srun exited with status" in text and "requeueing" not in text
    deadline = time.monotonic() + 10
    while processes_of_job(job_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_of_job(job_id) == []  # nothing left hanging on any node
    print(f"\nkilled rank 1 of job {job_id}: FAILED {seconds:.1f} s later")


def test_sweep_runs_each_array_task_in_its_own_dir_and_requeues_tasks_separately(cluster, tmp_path):
    # Two one-node tasks (the two nodes run them side by side), W&B group = the sweep's job name.
    out = tmp_path / "sweep"
    train = [*TRAIN[:TRAIN.index("--epochs")], "--epochs", "2", *TRAIN[TRAIN.index("--epochs") + 2:]]
    job_id, printed = submit(cluster, ["--nodes", "1", "--job-name", "lr-sweep", "--sweep", "lr=0.003,0.001",
                                       "--output-dir", str(out)], train)
    assert f"  task 0: {out}/lr-0.003" in printed and f"  task 1: {out}/lr-0.001" in printed
    # Preempt task 0 only: it requeues by itself, task 1 runs on undisturbed.
    wait_path(out / "lr-0.003" / "checkpoints" / "step-00000005" / "manifest.json", 120, cluster, job_id)
    subprocess.run(["scancel", "--signal=USR1", "--full", f"{job_id}_0"], env=cluster, check=True)
    records = wait_job(cluster, job_id, 240)
    by_task = {r["ArrayTaskId"]: r for r in records}
    assert sorted(by_task) == ["0", "1"]
    for record in by_task.values():
        assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", record
    assert (by_task["0"]["Restarts"], by_task["1"]["Restarts"]) == ("1", "0")
    for task, lr in (("0", 0.003), ("1", 0.001)):
        run = out / f"lr-{lr}"
        saved = json.loads((run / "config.json").read_text())["config"]
        assert (saved["lr"], saved["wandb_group"], saved["output_dir"]) == (lr, "lr-sweep", str(run))
        assert [row["epoch"] for row in read_metrics(run)] == [1, 2]
        assert (run / "final" / "model.safetensors").exists()
        assert (out / "slurm" / f"lr-sweep-{job_id}_{task}.out").exists()
    # In W&B: two runs in the sweep's group; the preempted task's requeued part continues its run.
    wandb_runs = {lr: [read_run_file(p) for p in find_run_files(out / f"lr-{lr}" / "wandb")] for lr in (0.003, 0.001)}
    assert [len(parts) for parts in wandb_runs.values()] == [2, 1]
    assert {(part.group, part.run_id) for parts in wandb_runs.values() for part in parts} == {
        ("lr-sweep", wandb_runs[0.003][0].run_id), ("lr-sweep", wandb_runs[0.001][0].run_id)}
    assert wandb_runs[0.003][0].run_id != wandb_runs[0.001][0].run_id
    weights = [final_weights(out / "lr-0.003"), final_weights(out / "lr-0.001")]
    assert any((weights[0][k] != weights[1][k]).any() for k in weights[0])  # two different runs


def test_language_model_job_trains_on_two_nodes(cluster, tmp_path):
    """`launcher submit -- recipes/lm.py ...`: the language-model recipe as a 2-node job (a local corpus)."""
    corpus = tmp_path / "corpus"
    for split, count in (("train", 40), ("validation", 4)):
        (corpus / split).mkdir(parents=True)
        for i in range(count):
            (corpus / split / f"{i}.txt").write_text(f"document {i} of the {split} split\n" * 20)
    run = tmp_path / "lm-run"
    job_id, _ = submit(cluster, ["--nodes", "2", "--output-dir", str(run)],
                       ["recipes/lm.py", "--dataset", str(corpus), "--block-size", "32", "--batch-size", "8",
                        "--epochs", "1", "--sample-tokens", "8"])
    log = run / "slurm" / f"lm-{job_id}.out"
    [record] = wait_job(cluster, job_id, 240, log)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", read_log(log)[-4000:]
    [row] = read_metrics(run)
    assert row["world_size"] == 2 and row["val_perplexity"] > 1 and row["tokens_per_second"] > 0
    info = json.loads((run / "config.json").read_text())["run_info"]
    assert (info["num_nodes"], info["procs_per_node"]) == (2, 1)
    assert "sample of the final weights" in read_log(log)


def test_env_from_host_reaches_the_job_on_every_node_and_never_the_script(cluster, tmp_path):
    """`--env-from-host NAME`: the value travels in the environment sbatch copies into the job (--export=ALL);
    the script kept under the log dir names the variable only."""
    probe = tmp_path / "probe.py"
    probe.write_text("import os, pathlib, sys\n"
                     "out = pathlib.Path(sys.argv[sys.argv.index('--output-dir') + 1])\n"
                     "out.mkdir(parents=True, exist_ok=True)\n"
                     "value = os.environ.get('LAUNCHER_PROBE_TOKEN', '<unset>')\n"
                     "(out / f\"seen-by-rank-{os.environ.get('RANK', '0')}\").write_text(value)\n")
    run = tmp_path / "run"
    secret = f"tok-{time.time_ns()}"
    job_id, _ = submit({**cluster, "LAUNCHER_PROBE_TOKEN": secret},
                       ["--nodes", "2", "--output-dir", str(run), "--env-from-host", "LAUNCHER_PROBE_TOKEN"],
                       [str(probe)])
    log = run / "slurm" / f"probe-{job_id}.out"
    [record] = wait_job(cluster, job_id, 180, log)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", read_log(log)[-4000:]
    assert {p.name: p.read_text() for p in run.glob("seen-by-rank-*")} == {
        "seen-by-rank-0": secret, "seen-by-rank-1": secret}  # both nodes' processes
    script = run / "slurm" / f"probe-{job_id}.sbatch"
    assert "LAUNCHER_PROBE_TOKEN" in script.read_text() and secret not in script.read_text()
    assert secret not in read_log(log)
    assert oct(script.stat().st_mode & 0o777) == "0o600"
