"""Running the recipe for real: `accelerate launch` subprocesses, process-tree signals, result files."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "classify.py"
CONFIGS = ROOT / "accelerate_configs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update({"WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def launch_cmd(args: list[str], nproc: int = 1, *, script: Path = RECIPE, extra: list[str] = (),
               config: str | None = None) -> list[str]:
    """`accelerate launch` of the recipe: 1 process with cpu.yaml, N with cpu_ddp.yaml (gloo); or N processes
    with the named accelerate config (e.g. config="cpu_fsdp")."""
    base = [sys.executable, "-m", "accelerate.commands.launch"]
    if config is not None:
        base += ["--config_file", str(CONFIGS / f"{config}.yaml"), "--num_processes", str(nproc),
                 "--main_process_port", str(free_port())]
    elif nproc == 1:
        base += ["--config_file", str(CONFIGS / "cpu.yaml")]
    else:
        base += ["--config_file", str(CONFIGS / "cpu_ddp.yaml"), "--num_processes", str(nproc),
                 "--main_process_port", str(free_port())]
    return base + list(extra) + [str(script), *args]


def start(args: list[str], nproc: int = 1, *, env: dict | None = None, cwd: Path | None = None,
          **kw) -> subprocess.Popen:
    return subprocess.Popen(launch_cmd(args, nproc, **kw), env=env or make_env(), cwd=cwd or ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def run(args: list[str], nproc: int = 1, *, timeout: float = 300, check: bool = True,
        **kw) -> subprocess.CompletedProcess:
    proc = start(args, nproc, **kw)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_tree(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s:\n{out[-4000:]}") from None
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}:\n{out[-6000:]}")
    return result


def signal_tree(pid: int, sig: int) -> None:
    """Signal a process and all its descendants: torchrun puts each worker in a session of its own."""
    try:
        parent = psutil.Process(pid)
        procs = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return predicate()
        time.sleep(interval)
    return False


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


TIMING_KEYS = ("epoch_seconds", "samples_per_second", "tokens_per_second", "tokens_per_second_per_process", "mfu")


def comparable(rows: list[dict]) -> list[dict]:
    """Metrics rows without the wall-clock values, which differ between any two runs."""
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def final_weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert (a[key] == b[key]).all(), f"{key} differs"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@contextmanager
def tmpfs(mnt: Path, size: str = "16m", *options: str) -> Iterator[Path]:
    """A small tmpfs at `mnt` (a full or read-only disk for a test; needs root), unmounted whatever happens.
    Fails in CI when it cannot be mounted, skips elsewhere."""
    mnt.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join((f"size={size}", *options)), "tmpfs", str(mnt)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        if in_ci():
            pytest.fail(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=True)
