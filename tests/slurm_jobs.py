"""The local two-node SLURM cluster (tests/slurm/cluster.sh) for the tests: its fixtures and job helpers.

`cluster` and `baseline` are session fixtures registered once in tests/conftest.py, so the cluster starts
once and the uninterrupted 2-node baseline job runs once for tests/test_slurm_cluster.py and
tests/test_slurm_faults.py together (a fixture imported into two test modules is built once per module).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import free_port, in_ci, make_env

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
STATE = Path(os.environ.get("LAUNCHER_SLURM_STATE", "/tmp/launcher-slurm"))
SLURM_CONF = STATE / "slurm.conf"
# Digits, 45 optimizer steps an epoch on two processes, each step slowed by 50 ms (tests/slurm/slow_model.py)
# so that signals and kills land mid-training. --keep-last keeps every checkpoint for the assertions.
TRAIN = ["recipes/classify.py", "--model", "tests.slurm.slow_model:build", "--epochs", "3", "--batch-size", "16",
         "--save-every-steps", "5", "--keep-last", "100"]
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="session")
def cluster():
    """Environment for SLURM commands; starts the local cluster (and stops it again if it started it)."""
    reason = None
    started = False
    if os.geteuid() != 0:
        reason = "the local SLURM cluster needs root (it starts munged, slurmctld and slurmd)"
    elif not shutil.which("slurmctld") or not shutil.which("sbatch"):
        reason = "SLURM is not installed: run tests/slurm/install.sh"
    else:
        up = subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True, text=True).returncode == 0
        if not up:
            result = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=180)
            if result.returncode != 0:
                reason = f"tests/slurm/cluster.sh start failed: {result.stderr.strip()[-1500:]}"
            started = True
    if reason:
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    env = make_env(SLURM_CONF=str(SLURM_CONF), WANDB_MODE="offline")
    yield env
    if started:
        subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, text=True, timeout=120)


def read_log(path: Path) -> str:
    # Two nodes append to one file, and progress bars may be cut mid-character by a kill.
    return path.read_text(errors="replace")


def submit(env: dict, options: list[str], train: list[str] = TRAIN) -> tuple[str, str]:
    """`launcher submit` from the repository root; returns (job id, what it printed)."""
    argv = [sys.executable, "-m", "launcher", "submit", "--gpus-per-node", "0", "--time", "10",
            "--env", f"PYTHONPATH={ROOT}", *options, "--", *train]
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    match = re.match(r"Submitted job (\d+)", result.stdout)
    assert match, result.stdout
    return match.group(1), result.stdout


def job_records(env: dict, job_id: str) -> list[dict]:
    """`scontrol show job -o`: one dict per job (one per array task)."""
    result = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    records = []
    for line in result.stdout.strip().splitlines():
        records.append(dict(item.split("=", 1) for item in line.split() if "=" in item))
    return records


def finished(records: list[dict]) -> bool:
    return bool(records) and all(r["JobState"] in DONE for r in records)


def wait_job(env: dict, job_id: str, timeout: float, log: Path | None = None) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = job_records(env, job_id)
        if finished(records):
            time.sleep(0.5)  # the batch shell's last lines reach the log
            return job_records(env, job_id)
        time.sleep(0.25)
    subprocess.run(["scancel", job_id], env=env)
    text = read_log(log)[-6000:] if log and log.exists() else ""
    raise AssertionError(f"job {job_id} not finished after {timeout}s: {job_records(env, job_id)}\n{text}")


def wait_path(path: Path, timeout: float, env: dict, job_id: str) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout}s: {job_records(env, job_id)}")
        time.sleep(0.02)


def processes_of_job(job_id: str) -> list[psutil.Process]:
    """This machine's processes that belong to the job (srun exports SLURM_JOB_ID to everything it starts)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("SLURM_JOB_ID") == job_id:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def checkpoint_reasons(run: Path) -> list[str]:
    """Why each checkpoint of a run was written: step, epoch or preempted."""
    states = sorted((run / "checkpoints").glob("step-*/trainer_state.json"))
    return [json.loads(path.read_text())["reason"] for path in states]


def local_reference(tmp_path: Path) -> subprocess.Popen:
    """The same training without SLURM: `accelerate launch --multi_gpu --num_processes 2`, gloo on CPU."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", str(free_port()), *TRAIN, "--output-dir", str(tmp_path / "local")]
    return subprocess.Popen(command, cwd=ROOT, env=make_env(ACCELERATE_USE_CPU="true"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="session")
def baseline(cluster, tmp_path_factory):
    """One uninterrupted 2-node job, and the same run as two local processes, side by side; built once for
    tests/test_slurm_cluster.py and tests/test_slurm_faults.py (one xdist worker runs every SLURM test)."""
    tmp = tmp_path_factory.mktemp("baseline")
    started = time.monotonic()
    job_id, printed = submit(cluster, ["--nodes", "2", "--output-dir", str(tmp / "slurm-run")])
    reference = local_reference(tmp)
    log = tmp / "slurm-run" / "slurm" / f"classify-{job_id}.out"
    records = wait_job(cluster, job_id, 240, log)
    seconds = time.monotonic() - started
    out, _ = reference.communicate(timeout=240)
    assert reference.returncode == 0, out[-4000:]
    print(f"\n2-node job {job_id}: submission to COMPLETED in {seconds:.1f} s")
    return {"job_id": job_id, "printed": printed, "records": records, "dir": tmp / "slurm-run", "log": log,
            "local": tmp / "local"}
