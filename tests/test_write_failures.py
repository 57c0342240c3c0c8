"""A disk that fills during a run: real tmpfs mounts, real recipe runs, nothing mocked."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from launcher.checkpoint import append_line_durable, list_checkpoints, validate
from launcher.errors import EXIT_WRITE_FAILED
from tests.helpers import (
    RECIPE,
    ROOT,
    assert_same_weights,
    comparable,
    final_weights,
    make_env,
    read_metrics,
    run,
    tmpfs,
)

# 1 process: 45 steps an epoch, saves at 10, 20, 30 (mid-epoch); 2 processes: 23 steps, saves at 10, 20, 23
# (an epoch end, with its metrics line and `best`). The disk holds two checkpoints and a half: the third fails.
ARGS = ["--epochs", "3", "--batch-size", "32", "--save-every-steps", "10", "--keep-last", "2", "--lr", "3e-3"]
PAGE = 4096


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs, unmounted again whatever the test does."""
    with tmpfs(tmp_path / "disk", "16m") as mnt:
        yield mnt


def available(path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def fill(mnt, leave: int):
    """A filler file that leaves `leave` bytes of the disk free; returns it (delete it to free the space)."""
    filler = mnt / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, available(mnt) - leave)
    return filler


def checkpoint_bytes(run_dir) -> int:
    """What one checkpoint takes on a tmpfs: whole pages per file."""
    folder = run_dir / "checkpoints" / list_checkpoints(run_dir)[-1]
    return sum(-(-f.stat().st_size // PAGE) * PAGE for f in folder.iterdir()) + PAGE


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    runs = {}
    for nproc in (1, 2):
        out = tmp_path_factory.mktemp(f"clean{nproc}")
        run([*ARGS, "--output-dir", str(out)], nproc=nproc)
        runs[nproc] = out
    return runs


def test_metrics_line_that_does_not_fit_leaves_the_file_as_it_was(small_disk):
    metrics = small_disk / "metrics.jsonl"
    append_line_durable(metrics, '{"epoch": 1}\n')
    fill(small_disk, leave=0)
    with pytest.raises(OSError):
        append_line_durable(metrics, "x" * (3 * PAGE) + "\n")  # a single write() that can only partly land
    assert metrics.read_text() == '{"epoch": 1}\n'


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_full_disk_stops_every_rank_with_one_line_loses_nothing_and_resumes_exactly(uninterrupted, small_disk,
                                                                                  nproc):
    out = small_disk / "run"
    filler = fill(small_disk, leave=int(2.5 * checkpoint_bytes(uninterrupted[nproc])) + 16 * PAGE)
    if nproc == 1:  # the recipe itself, to see its exit code (accelerate launch reports any failure as 1)
        failed = subprocess.run([sys.executable, str(RECIPE), *ARGS, "--output-dir", str(out)], env=make_env(),
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        assert failed.returncode == EXIT_WRITE_FAILED, failed.stdout[-3000:]
    else:
        failed = run([*ARGS, "--output-dir", str(out)], nproc=nproc, check=False)
        assert failed.returncode != 0 and re.search(r"exitcode\s*:\s*74", failed.stdout), failed.stdout[-3000:]
    errors = [line[line.index("classify.py: error:"):] for line in failed.stdout.splitlines()
              if "classify.py: error:" in line]  # the line may follow a progress bar's last \r
    assert len(errors) == 1, failed.stdout[-3000:]
    assert "cannot write checkpoint step-" in errors[0] and "no space left on device" in errors[0]
    assert f"(filesystem {small_disk})" in errors[0] and "--resume auto" in errors[0]
    # torchrun prints a traceback of its own when a worker fails; the workers print none
    assert "inline_container" not in failed.stdout and "WriteFailed" not in failed.stdout

    # Every earlier checkpoint is whole, nothing half-written could pass for one, best points at a folder.
    names = list_checkpoints(out)
    assert len(names) == 2, names
    for name in names:
        validate(out / "checkpoints" / name)
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith((".tmp", ".trash"))]
    best = out / "checkpoints" / "best"
    assert not best.is_symlink() or best.resolve().is_dir()
    rows = read_metrics(out) if (out / "metrics.jsonl").exists() else []  # every line parses
    assert [row["epoch"] for row in rows] == list(range(1, len(rows) + 1))

    filler.unlink()
    resumed = run([*ARGS, "--output-dir", str(out)], nproc=nproc)
    assert f"resumed from {out / 'checkpoints' / names[-1]}" in resumed.stdout
    assert_same_weights(final_weights(out), final_weights(uninterrupted[nproc]))
    assert comparable(read_metrics(out)) == comparable(read_metrics(uninterrupted[nproc]))
