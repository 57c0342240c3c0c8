"""Corrupt checkpoints through the real recipe and the real `launcher export`: --resume auto falls back to the
previous checkpoint and ends exactly as an uninterrupted run; --eval-only, --resume PATH and export refuse in
one line (exit 2); export onto a full disk is one line, exit 74, nothing left behind; file modes follow the
umask. The many mutations are fuzzed in-process (tests/test_checkpoint_fuzz.py); these are the probes' cases.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launcher.checkpoint import _sha256, save_weights
from launcher.errors import EXIT_USAGE, EXIT_WRITE_FAILED
from tests.helpers import RECIPE, ROOT, assert_same_weights, final_weights, make_env, read_metrics, run, tmpfs

pytestmark = pytest.mark.slow  # every test reads the reference run's files

# One process, batch 64: 23 steps an epoch, checkpoints step-23 and step-46 (the epoch ends).
ARGS = ["--epochs", "2", "--batch-size", "64"]
NEWEST, PREVIOUS = "step-00000046", "step-00000023"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, written under umask 022 (its children inherit it)."""
    out = tmp_path_factory.mktemp("reference")
    old = os.umask(0o022)
    try:
        run([*ARGS, "--output-dir", str(out)])
    finally:
        os.umask(old)
    return out


def copy_run(reference: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference, out, symlinks=True)
    return out


def edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))


def recipe(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RECIPE), *args], env=make_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", "export", *args], env=make_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def one_error_line(proc: subprocess.CompletedProcess, prefix: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), proc.stderr[-3000:]
    return lines[0]


def resumes_from_previous_and_ends_as_uninterrupted(out: Path, reference: Path) -> None:
    result = run([*ARGS, "--output-dir", str(out)])
    assert "resumed from " + str(out / "checkpoints" / PREVIOUS) in result.stdout, result.stdout[-3000:]
    assert [row["epoch"] for row in read_metrics(out)] == [1, 2]
    assert_same_weights(final_weights(out), final_weights(reference))


def test_misspelt_size_in_the_newest_manifest_falls_back(reference, tmp_path):
    out = copy_run(reference, tmp_path)
    edit_manifest(out / "checkpoints" / NEWEST,
                  lambda m: m["files"]["model.safetensors"].__setitem__("szie", m["files"]["model.safetensors"].pop(
                      "size")))
    resumes_from_previous_and_ends_as_uninterrupted(out, reference)


def test_deleted_sha256_and_zeroed_weights_fall_back_and_never_load(reference, tmp_path):
    out = copy_run(reference, tmp_path)
    newest = out / "checkpoints" / NEWEST
    weights = newest / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    raw[header:] = bytes(len(raw) - header)  # every tensor zero, the same size
    weights.write_bytes(bytes(raw))
    edit_manifest(newest, lambda m: m["files"]["model.safetensors"].pop("sha256"))
    resumes_from_previous_and_ends_as_uninterrupted(out, reference)


def test_eval_only_of_a_truncated_checkpoint_its_manifest_vouches_for_is_one_line(reference, tmp_path):
    checkpoint = tmp_path / NEWEST
    shutil.copytree(reference / "checkpoints" / NEWEST, checkpoint)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    edit_manifest(checkpoint, lambda m: m["files"].__setitem__(
        "model.safetensors", {"size": weights.stat().st_size, "sha256": _sha256(weights)}))
    for extra in (["--eval-only"], []):
        proc = recipe(["--batch-size", "64", *extra, "--resume", str(checkpoint), "--output-dir",
                       str(tmp_path / f"out{len(extra)}")])
        assert proc.returncode == EXIT_USAGE, proc.stderr[-3000:]
        line = one_error_line(proc, "classify.py: error:")
        assert "model.safetensors" in line and "truncated" in line, line


def test_export_of_a_corrupt_checkpoint_is_one_line_exit_2(reference, tmp_path):
    checkpoint = tmp_path / NEWEST
    shutil.copytree(reference / "checkpoints" / NEWEST, checkpoint)
    edit_manifest(checkpoint, lambda m: m["files"]["optimizer.pt"].__setitem__("szie", m["files"]["optimizer.pt"].pop(
        "size")))
    out = tmp_path / "exported" / "w.safetensors"
    proc = export(str(checkpoint), str(out))
    assert proc.returncode == EXIT_USAGE, proc.stderr[-3000:]
    line = one_error_line(proc, "launcher export: error:")
    assert "not a valid checkpoint" in line and "lacks size" in line, line
    assert not out.exists()


def test_export_of_final_says_what_to_give_instead(reference, tmp_path):
    proc = export(str(reference / "final"), str(tmp_path / "w.safetensors"))
    assert proc.returncode == EXIT_USAGE, proc.stderr[-3000:]
    line = one_error_line(proc, "launcher export: error:")
    assert "final weights, not a checkpoint" in line and "incomplete write" not in line, line
    assert str(reference / "checkpoints") in line, line
    proc = export(str(reference), str(tmp_path / "w.safetensors"))  # what it suggests works
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs (smaller than the model), unmounted again whatever the test does."""
    with tmpfs(tmp_path / "disk", "64k") as mnt:
        yield mnt


def test_export_onto_a_full_disk_is_one_line_exit_74_and_leaves_nothing(reference, tiny_disk):
    out = tiny_disk / "w.safetensors"
    proc = export(str(reference / "checkpoints" / NEWEST), str(out))
    assert proc.returncode == EXIT_WRITE_FAILED, proc.stderr[-3000:]
    line = one_error_line(proc, "launcher export: error:")
    assert "no space left on device" in line and str(out) in line, line
    assert list(tiny_disk.iterdir()) == []  # no half-written file, no temp file


def test_weights_files_follow_the_umask(reference, tmp_path):
    """model.safetensors of every checkpoint and of final/ is 0644 under umask 022, like the other files."""
    for folder in (reference / "checkpoints" / PREVIOUS, reference / "checkpoints" / NEWEST, reference / "final"):
        modes = {f.name: f.stat().st_mode & 0o777 for f in folder.iterdir() if f.is_file()}
        assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, (folder, modes)
    old = os.umask(0o027)
    try:
        save_weights({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o640
