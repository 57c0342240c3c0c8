"""Clean exits: nothing left in the temp folder or the run folder by a finished, failed or killed run that a later
launch does not clean up, and one line with the real cause for outputs that cannot be written.

Real processes (the recipe itself, one process: its exit code is the recipe's), real mounts (a read-only tmpfs, a
full tmpfs), W&B offline with its temp folder ($TMPDIR) pointed at a folder of the test's own.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from launcher.errors import EXIT_USAGE, EXIT_WRITE_FAILED
from launcher.loop.outputs import sweep_stale_temp
from launcher.tracking.tracker import staging_name, sweep_wandb_core_leftovers
from tests.helpers import RECIPE, ROOT, make_env, signal_tree, tmpfs, wait_for

TINY = ["--epochs", "1"]
LONG = ["--epochs", "40"]  # about 0.1 s an epoch on the embedded digits: long enough to be killed mid-run


@pytest.fixture
def short_tmp():
    """A fresh temp folder with a short path: wandb-core puts a unix socket in it, whose path may not exceed
    108 bytes (pytest's tmp_path plus the socket's name can)."""
    path = Path(tempfile.mkdtemp(prefix="ce-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _env(home: Path, tmp: Path | None = None, **extra: str) -> dict:
    """W&B offline, its settings, cache and data under `home`, $TMPDIR the folder the test watches (`tmp`), and
    torch's compile cache (a persistent per-user cache, not a per-run temp file) kept out of it."""
    env = make_env(WANDB_MODE="offline", TORCHINDUCTOR_CACHE_DIR=str(home / "inductor"),
                   WANDB_CONFIG_DIR=str(home / "wandb-config"), WANDB_CACHE_DIR=str(home / "wandb-cache"),
                   WANDB_DATA_DIR=str(home / "wandb-data"), **extra)
    if tmp is not None:
        env["TMPDIR"] = str(tmp)
    return env


def recipe(args: list[str], env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RECIPE), *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def errors(out: str) -> list[str]:
    return [line[line.index("classify.py: error:"):] for line in out.splitlines() if "classify.py: error:" in line]


def killed_mid_run(args: list[str], env: dict, log: Path, *, tree: bool) -> None:
    """Start the recipe and SIGKILL it in its third epoch (its first checkpoint is whole): the whole process
    tree (wandb-core too, as the OOM killer or a SLURM cgroup does) or the recipe's process alone."""
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(RECIPE), *args], env=env, cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert wait_for(lambda: "epoch 2:" in log.read_text(), 120, proc), log.read_text()[-3000:]
        if tree:
            signal_tree(proc.pid, signal.SIGKILL)
        else:
            proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL, log.read_text()[-3000:]
    finally:
        signal_tree(proc.pid, signal.SIGKILL)
        proc.wait()


def left_behind(run_dir: Path) -> list[str]:
    """Temp names in a run folder: its top, final/, checkpoints/ and each checkpoint."""
    found = []
    for folder in (run_dir, run_dir / "final", run_dir / "checkpoints",
                   *[p for p in (run_dir / "checkpoints").glob("*") if p.is_dir() and not p.is_symlink()]):
        if folder.is_dir():
            found += [str(p.relative_to(run_dir)) for p in folder.iterdir()
                      if ".tmp" in p.name or p.name.startswith((".wandb-tmp-", ".trash-", ".best-"))]
    return found


def dead_pid() -> int:
    """A pid that just ended (reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_ten_launches_finished_failed_and_killed_leave_no_temp_folder_behind(tmp_path, short_tmp):
    home, tmp = tmp_path, short_tmp
    env = _env(home, tmp)
    a, c, f = home / "a", home / "c", home / "f"
    started = time.monotonic()

    assert recipe([*TINY, "--output-dir", str(a)], env).returncode == 0                          # 1 finished
    bad = recipe([*TINY, "--batch-size", "0", "--output-dir", str(home / "b")], env)              # 2 bad input
    assert bad.returncode == EXIT_USAGE, bad.stdout[-2000:]
    bad = recipe([*TINY, "--resume", str(home / "nothing"), "--output-dir", str(home / "b2")], env)  # 3
    assert bad.returncode == EXIT_USAGE, bad.stdout[-2000:]
    killed_mid_run([*LONG, "--output-dir", str(c)], env, home / "c.log", tree=True)               # 4 killed
    assert [p for p in c.iterdir() if p.name.startswith(".wandb-tmp-")], "wandb's temp folders were not in RUN"
    done = recipe([*LONG, "--output-dir", str(c)], env)                                           # 5 resumed
    assert done.returncode == 0 and "resumed from" in done.stdout, done.stdout[-3000:]
    evaluated = recipe(["--eval-only", "--resume", str(a / "checkpoints" / "best"), "--output-dir",  # 6 eval
                        str(home / "e")], env)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:]
    killed_mid_run([*LONG, "--output-dir", str(f)], env, home / "f.log", tree=False)              # 7 killed
    done = recipe([*LONG, "--output-dir", str(f)], env)                                           # 8 resumed
    assert done.returncode == 0 and "resumed from" in done.stdout, done.stdout[-3000:]
    (home / "afile").write_text("x")
    bad = recipe([*TINY, "--output-dir", str(home / "afile")], env)                               # 9 a file
    assert bad.returncode == EXIT_USAGE, bad.stdout[-2000:]
    # A SIGKILL just after the last checkpoint, before final/trainer_state.json was renamed into place.
    stale = a / "final" / f".trainer_state.json.tmp-{dead_pid()}"
    stale.write_text("{")
    done = recipe([*TINY, "--output-dir", str(a)], env)                                           # 10 again
    assert done.returncode == 0, done.stdout[-3000:]
    assert not stale.exists()

    # wandb-core removes its own socket folder a moment after its client ends
    assert wait_for(lambda: not list(tmp.iterdir()), 15), sorted(p.name for p in tmp.iterdir())
    for run_dir in (a, c, f, home / "e"):
        assert left_behind(run_dir) == [], run_dir
    print(f"10 launches in {time.monotonic() - started:.0f} s")


def test_sweep_removes_only_dead_owners_temp_files(tmp_path, short_tmp):
    run_dir, tmp = tmp_path / "run", short_tmp
    for folder in (run_dir / "final", run_dir / "checkpoints" / "step-00000010"):
        folder.mkdir(parents=True)
    dead, live, host = dead_pid(), os.getpid(), socket.gethostname()
    gone = [run_dir / "final" / f".trainer_state.json.tmp-{dead}", run_dir / "final" / ".model.safetensors.tmp",
            run_dir / f".metrics.jsonl.tmp-{dead}", run_dir / "checkpoints" / f".best.tmp-{dead}",
            run_dir / "checkpoints" / "step-00000010" / f".manifest.json.tmp-{dead}"]
    kept = [run_dir / "final" / "trainer_state.json", run_dir / f".eval.json.tmp-{live}",  # a live writer's
            run_dir / ".eval.json.tmp", run_dir / "final" / "model.safetensors"]
    for path in gone + kept:
        path.write_text("x")
    (run_dir / "final" / ".hf.tmp").mkdir()  # the HF export's temp folder
    gone.append(run_dir / "final" / ".hf.tmp")
    gone.append(run_dir / staging_name(host, dead))  # wandb's temp folders of a dead process of this host
    kept += [run_dir / staging_name(host, live), run_dir / staging_name("another-host", dead)]
    for path in gone[-1:] + kept[-2:]:
        (path / "tmpabcwandb-media").mkdir(parents=True)
    # wandb-core's socket folder and system-monitor socket: removed only when every pid they name is dead
    core_gone, core_kept = tmp / f"wandb-{dead}-{dead}-123", tmp / f"wandb-{live}-{dead}-456"
    for folder in (core_gone, core_kept):
        folder.mkdir()
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(folder / "socket"))
    not_a_socket = tmp / f"wandb-{dead}-{dead}-789"
    (not_a_socket / "data").mkdir(parents=True)

    removed = set(sweep_stale_temp(run_dir)) | set(sweep_wandb_core_leftovers(tmp))
    assert removed == set(gone) | {core_gone}
    assert all(not p.exists() for p in gone) and all(p.exists() for p in kept)
    assert core_kept.exists() and not_a_socket.exists()


def test_output_dir_that_is_a_file_is_one_line_and_exit_2(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    env = _env(tmp_path)
    for out, says in ((afile, f"--output-dir {afile} is a file, not a folder"),
                      (afile / "sub", f"--output-dir {afile / 'sub'} is inside {afile}, which is a file")):
        for extra in ([], ["--eval-only", "--resume", str(tmp_path / "missing")]):
            result = recipe([*TINY, *extra, "--output-dir", str(out)], env)
            assert result.returncode == EXIT_USAGE, result.stdout[-2000:]
            assert len(errors(result.stdout)) == 1 and says in errors(result.stdout)[0], result.stdout[-2000:]
            assert "Traceback" not in result.stdout
    assert afile.read_text() == "keep me"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    result = recipe([*TINY, "--output-dir", str(out)], make_env())
    assert result.returncode == 0, result.stdout[-3000:]
    return out / "checkpoints" / "best"


@pytest.mark.slow
def test_eval_only_into_a_read_only_folder_is_one_line_naming_the_cause(trained, tmp_path):
    mnt = tmp_path / "ro"
    with tmpfs(mnt):
        (mnt / "out").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)  # read-only even for root
        env = _env(tmp_path)
        for extra, what in (([], "eval.json"), (["--predictions", str(mnt / "p.parquet")], "predictions")):
            result = recipe(["--eval-only", "--resume", str(trained), "--output-dir", str(mnt / "out"), *extra], env)
            assert result.returncode == EXIT_USAGE, result.stdout[-3000:]
            [line] = errors(result.stdout)
            assert f"cannot write {what}" in line and "read-only file system" in line, line
            assert "run the same --eval-only command again" in line and "--resume auto" not in line, line
            assert "Traceback" not in result.stdout and ".tmp-" not in result.stdout, result.stdout[-3000:]


@pytest.mark.slow
def test_full_disk_during_predictions_says_free_space_and_rerun_the_eval(trained, tmp_path):
    mnt = tmp_path / "disk"
    with tmpfs(mnt):
        filler = mnt / "filler"
        stats = os.statvfs(mnt)
        with open(filler, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, stats.f_bavail * stats.f_frsize)
        parquet = mnt / "predictions.parquet"
        args = ["--eval-only", "--resume", str(trained), "--output-dir", str(tmp_path / "eval"),
                "--predictions", str(parquet)]
        result = recipe(args, _env(tmp_path))
        assert result.returncode == EXIT_WRITE_FAILED, result.stdout[-3000:]
        [line] = errors(result.stdout)
        assert f"cannot write predictions to {parquet}" in line and "no space left on device" in line, line
        assert "free space, then run the same --eval-only command again" in line and "--resume auto" not in line
        assert sorted(p.name for p in mnt.iterdir()) == ["filler"]  # no temp file left
        filler.unlink()
        again = recipe(args, _env(tmp_path))
        assert again.returncode == 0 and parquet.exists(), again.stdout[-3000:]
