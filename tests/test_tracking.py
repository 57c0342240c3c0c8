"""W&B tracking: real wandb in offline mode, real `accelerate launch` process groups, run files read back.

The slow tests run a job (tests/tracking_job.py, or the recipe) and read the `run-<id>.wandb` files it
leaves under WANDB_DIR with launcher.tracking.wandb_records: what W&B would upload is exactly what is checked.
"""

from __future__ import annotations

import http.server
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from launcher.config import TrainConfig
from launcher.tracking.tracker import (
    NullTracker,
    best_summary,
    build_config,
    confusion_matrix_table,
    epoch_metrics,
    first_rows,
    generate_run_id,
    resolve_mode,
    run_metadata,
    scrub,
    secret_values,
    start_tracker,
    train_metrics,
)
from launcher.tracking.wandb_records import RecordFileError, find_run_files, iter_record_bytes, read_run_file
from tests.helpers import ROOT, read_metrics, run, signal_tree, start, wait_for

JOB = ROOT / "tests" / "tracking_job.py"
SECRET = "local-" + "S3CR3TMARKER" * 4  # wandb accepts this shape of key
HF_SECRET = "hf_TOKENMARKER0123456789"


# ---------------------------------------------------------------------------------------------------------
# pure functions


def test_mode_flag_wins_then_environment_then_credentials():
    assert resolve_mode("disabled", {"WANDB_MODE": "online"}, credentials=True) == ("disabled", False)
    assert resolve_mode(None, {"WANDB_MODE": "offline"}, credentials=True) == ("offline", False)
    assert resolve_mode(None, {"WANDB_MODE": "dryrun"}, credentials=True) == ("offline", False)
    assert resolve_mode(None, {"WANDB_DISABLED": "true"}, credentials=True) == ("disabled", False)
    assert resolve_mode(None, {}, credentials=True) == ("online", False)
    # No credentials: offline, and the caller is told so it can print how to sync later.
    assert resolve_mode(None, {}, credentials=False) == ("offline", True)


def test_secrets_are_dropped_by_name_and_redacted_by_value():
    env = {"WANDB_API_KEY": SECRET, "HF_TOKEN": HF_SECRET, "DB_PASSWORD": "hunter22", "HOME": "/root",
           "SHORT_KEY": "abc"}
    found = secret_values(env)
    assert set(found) == {SECRET, HF_SECRET, "hunter22"}  # too-short values are not treated as secrets
    cleaned = scrub({"lr": 0.1, "api_key": "x", "hf_token": "y", "max_tokens": 5, "key_dim": 8,
                     "note": f"run with {SECRET}", "tags": ["a", HF_SECRET]}, found)
    assert cleaned == {"lr": 0.1, "max_tokens": 5, "key_dim": 8, "note": "run with <redacted>",
                       "tags": ["a", "<redacted>"]}


def test_config_holds_every_hyperparameter_and_run_facts_without_clobbering():
    config = TrainConfig(lr=0.02, epochs=3)
    merged = build_config(config.to_dict(), {"world_size": 4, "model": "mlp-v2"},
                          {"git_commit": "abc", "slurm_job_id": 7}, environ={})
    assert {k: merged[k] for k in config.to_dict()} == config.to_dict()
    assert merged["world_size"] == 4 and merged["run_model"] == "mlp-v2" and merged["model"] == "mlp"
    assert merged["git_commit"] == "abc" and merged["slurm_job_id"] == 7


def test_run_metadata_reads_slurm_ids_and_the_git_commit(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "train.py").write_text("print()\n")
    subprocess.run([*git, "add", "train.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    sha = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    env = {"SLURM_JOB_ID": "123", "SLURM_ARRAY_JOB_ID": "120", "SLURM_ARRAY_TASK_ID": "3",
           "SLURM_RESTART_COUNT": "1"}
    meta = run_metadata(env, code_dir=repo)
    assert meta == {"git_commit": sha, "git_dirty": False, "slurm_job_id": 123, "slurm_array_job_id": 120,
                    "slurm_array_task_id": 3, "slurm_restart_count": 1}
    (repo / "train.py").write_text("print(1)\n")
    assert run_metadata({}, code_dir=repo)["git_dirty"] is True
    outside = tmp_path / "plain"
    outside.mkdir()
    assert run_metadata({}, code_dir=outside) == {}


def test_metric_names():
    row = {"epoch": 2, "step": 40, "train_loss": 0.5, "train_accuracy": 0.8, "val_loss": 0.4,
           "val_accuracy": 0.9, "val_f1": 0.88, "val_confusion_matrix": [[1, 0], [0, 1]], "lr": 0.01,
           "epoch_seconds": 3.0, "samples_per_second": 99.0, "world_size": 2, "grad_norm": 1.5}
    assert epoch_metrics(row) == {"epoch": 2, "epoch/train_loss": 0.5, "epoch/train_accuracy": 0.8,
                                  "val/loss": 0.4, "val/accuracy": 0.9, "val/f1": 0.88, "epoch/lr": 0.01,
                                  "epoch/seconds": 3.0, "epoch/samples_per_second": 99.0,
                                  "epoch/grad_norm": 1.5}
    assert train_metrics({"loss": 1.0, "lr": 0.1, "samples_per_second": 5.0, "epoch": 0.5}) == {
        "train/loss": 1.0, "train/lr": 0.1, "train/samples_per_second": 5.0, "train/epoch": 0.5}


def test_best_is_the_whole_row_of_the_picked_epoch():
    history = [{"epoch": 1, "val_accuracy": 0.7, "val_loss": 0.9},
               {"epoch": 2, "val_accuracy": 0.9, "val_loss": 0.5},
               {"epoch": 3, "val_accuracy": 0.9, "val_loss": 0.3},
               {"epoch": 4, "val_accuracy": math.nan, "val_loss": math.nan}]
    # The earliest of the tied epochs, and its own loss (0.5), not the lowest loss of any epoch (0.3).
    assert best_summary(history, "val_accuracy", "max") == {
        "best/val_accuracy": 0.9, "best/val_loss": 0.5, "best/epoch": 2,
        "epochs_completed": 4}
    assert best_summary(history, "val_loss", "min")["best/epoch"] == 3
    assert best_summary([], "val_loss", "min") == {"epochs_completed": 0}


def test_confusion_matrix_rows_use_class_names_when_they_fit():
    assert confusion_matrix_table([[3, 1], [0, 4]], ["cat", "dog"]) == [
        ["cat", "cat", 3], ["cat", "dog", 1], ["dog", "cat", 0], ["dog", "dog", 4]]
    assert confusion_matrix_table([[1]], ["too", "many"]) == [["0", "0", 1]]


def test_a_predictions_table_is_its_first_rows_with_their_columns():
    columns = {"index": [0, 1, 2], "label": [1, 0, 1], "probabilities": [[0.2, 0.8], [0.9, 0.1], [0.4, 0.6]]}
    assert first_rows(columns, 2) == (["index", "label", "probabilities"], [[0, 1, [0.2, 0.8]], [1, 0, [0.9, 0.1]]])
    assert first_rows(columns, 10)[1][-1] == [2, 1, [0.4, 0.6]]


def test_generated_ids_look_like_wandb_ids():
    ids = {generate_run_id() for _ in range(50)}
    assert len(ids) == 50 and all(len(i) == 8 and i.isalnum() and i.islower() for i in ids)


# ---------------------------------------------------------------------------------------------------------
# start_tracker in this process (one rank)


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_missing_wandb_becomes_a_warning_and_a_local_only_tracker(tmp_path, accelerator, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    with caplog.at_level(logging.WARNING, logger="launcher.tracking.tracker"):
        tracker = start_tracker(TrainConfig(wandb_mode="offline"), accelerator=accelerator, output_dir=tmp_path,
                                run_info={}, resume_run_id="keepme1")
    assert type(tracker) is NullTracker and tracker.run_id == "keepme1"  # the id survives for a later resume
    assert "W&B import failed" in caplog.text and "training continues" in caplog.text
    tracker.log_train(1, {"loss": 1.0})
    tracker.log_epoch({"epoch": 1})
    tracker.finish([], 0)


def test_disabled_mode_logs_nothing_but_keeps_an_id(tmp_path, accelerator, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    tracker = start_tracker(TrainConfig(wandb_mode="disabled"), accelerator=accelerator, output_dir=tmp_path,
                            run_info={}, resume_run_id=None)
    assert type(tracker) is NullTracker and len(tracker.run_id) == 8
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------
# the run-file reader


def _write_offline_run(wandb_dir: Path, code: str, env_extra: dict | None = None) -> None:
    env = {**_clean_env(wandb_dir.parent), "WANDB_DIR": str(wandb_dir), "WANDB_MODE": "offline",
           **(env_extra or {})}
    subprocess.run([sys.executable, "-c", "import wandb\n" + code], env=env, check=True, capture_output=True,
                   timeout=120)


def test_reader_decodes_records_spanning_blocks_and_stops_at_a_torn_tail(tmp_path):
    big = "x" * 100_000  # one config record over three 32 KiB blocks: FIRST, MIDDLE, LAST chunks
    _write_offline_run(tmp_path / "wb", f"""
run = wandb.init(project="p", id="reader1", config={{"big": "{big}", "lr": 0.5}}, group="g", tags=["t"])
for step in range(3):
    run.log({{"loss": 1.0 / (step + 1)}}, step=step * 10)
run.summary["best"] = 7
run.finish()
""")
    [path] = find_run_files(tmp_path / "wb", "reader1")
    run = read_run_file(path)
    assert run.run_id == "reader1" and run.group == "g" and run.tags == ["t"] and run.complete
    assert run.config["big"] == big and run.config["lr"] == 0.5
    assert [(r["_step"], r["loss"]) for r in run.history_with("loss")] == [(0, 1.0), (10, 0.5), (20, 1 / 3)]
    assert run.summary["best"] == 7 and run.exit_code == 0

    torn = tmp_path / "torn.wandb"
    data = path.read_bytes()
    torn.write_bytes(data[: len(data) - 5])  # a writer killed mid-chunk
    records = list(iter_record_bytes(torn))
    assert 0 < len(records) < len(list(iter_record_bytes(path)))
    cut = read_run_file(torn)
    assert not cut.complete and cut.run_id == "reader1" and cut.exit_code is None

    corrupt = bytearray(data)
    corrupt[40] ^= 0xFF  # flips a byte of the first record: the CRC catches it
    (tmp_path / "bad.wandb").write_bytes(bytes(corrupt))
    assert not read_run_file(tmp_path / "bad.wandb").complete

    (tmp_path / "not.wandb").write_bytes(b"hello")
    with pytest.raises(RecordFileError):
        read_run_file(tmp_path / "not.wandb")


# ---------------------------------------------------------------------------------------------------------
# multi-process jobs


def _clean_env(home: Path, **extra: str) -> dict:
    """The environment of a job: no W&B settings or credentials from the developer's machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env.update({"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
                "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
                "NETRC": str(home / "no-netrc"), "WANDB_CONFIG_DIR": str(home / "wandb-config"),
                "WANDB_CACHE_DIR": str(home / "wandb-cache"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    env.update(extra)
    return env


def _launch(script: Path, args: list[str], env: dict, nproc: int = 2, timeout: float = 240,
            ) -> subprocess.CompletedProcess:
    return run(args, nproc, script=script, env=env, timeout=timeout, check=False)


def _all_files_bytes(root: Path):
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            yield path, path.read_bytes()


def _epochs_and_steps(files: list[Path]) -> tuple[list[int], list[int], set[str]]:
    """Validation epochs and history steps over all process starts of a run, in sync order."""
    epochs, steps, ids = [], [], set()
    for path in files:
        run = read_run_file(path)
        ids.add(path.stem.removeprefix("run-"))
        if run.run_id:  # a part killed before wandb-core flushed holds only the file header
            ids.add(run.run_id)
        epochs += [r["epoch"] for r in run.history_with("val/accuracy")]
        steps += [r["_step"] for r in run.history]
    return epochs, steps, ids


@pytest.mark.slow
def test_two_process_job_logs_one_run_from_rank_zero(tmp_path):
    env = _clean_env(tmp_path, WANDB_DIR=str(tmp_path / "wb"), WANDB_MODE="offline", WANDB_API_KEY=SECRET,
                     HF_TOKEN=HF_SECRET, SLURM_JOB_ID="4242", SLURM_ARRAY_TASK_ID="7")
    result = _launch(JOB, ["--output-dir", str(tmp_path / "out"), "--epochs", "3"], env)
    assert result.returncode == 0, result.stdout[-4000:]
    [path] = find_run_files(tmp_path / "wb")  # one process start, one run: rank 1 created nothing
    run = read_run_file(path)
    ranks = {line.split()[1]: line.split()[3] for line in result.stdout.splitlines() if line.startswith("rank ")}
    assert ranks == {"0": run.run_id, "1": run.run_id}  # every rank knows the id the checkpoint stores
    assert run.group == "tests" and set(run.tags) == {"tracker", "cpu"} and run.job_type == "train"
    for key in ("lr", "batch_size", "epochs", "seed", "dataset", "model", "world_size", "num_nodes",
                "procs_per_node", "mixed_precision", "distributed_type", "dataset_name", "model_name",
                "git_commit", "slurm_job_id", "slurm_array_task_id"):
        assert key in run.config, key
    assert run.config["world_size"] == 2 and run.config["lr"] == 0.003 and run.config["slurm_job_id"] == 4242
    val = run.history_with("val/accuracy")
    assert [r["epoch"] for r in val] == [1, 2, 3] and [r["_step"] for r in val] == [10, 20, 30]
    train = run.history_with("train/loss")
    assert [r["_step"] for r in train] == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert {m["name"]: m["step_metric"] for m in run.metrics}["val/*"] == "epoch"
    assert run.summary["best/val_accuracy"] == 0.8 and run.summary["best/val_loss"] == 0.5
    assert run.summary["best/epoch"] == 2 and run.exit_code == 0
    table = json.loads(next(path.parent.glob("files/media/table/best/confusion_matrix*.json")).read_text())
    assert table["data"][:2] == [["zero", "zero", 2], ["zero", "one", 1]]  # epoch 2's matrix
    for file, data in _all_files_bytes(tmp_path):
        assert SECRET.encode() not in data and HF_SECRET.encode() not in data, file


@pytest.mark.slow
def test_killed_before_wandb_flushed_then_resumed_logs_every_epoch_once(tmp_path):
    """SIGKILL right after epoch 2 was logged: wandb-core dies with its buffer, so W&B lost epoch 1 too.

    The resumed job (from epoch 1's checkpoint) re-logs epoch 1 from the checkpoint's history and continues.
    No mode and no credentials: offline by default, with a notice on how to sync.
    """
    env = _clean_env(tmp_path, WANDB_DIR=str(tmp_path / "wb"))
    args = ["--output-dir", str(tmp_path / "out"), "--epochs", "3"]
    first = _launch(JOB, [*args, "--stop-after-epoch", "2", "--stop", "kill"], env)
    assert first.returncode != 0
    assert "no credentials found" in first.stdout and "wandb sync" in first.stdout
    checkpoint = json.loads((tmp_path / "out" / "checkpoint.json").read_text())
    assert [r["epoch"] for r in checkpoint["history"]] == [1]
    second = _launch(JOB, args, env)
    assert second.returncode == 0, second.stdout[-4000:]
    files = find_run_files(tmp_path / "wb")
    assert len(files) == 2
    epochs, steps, ids = _epochs_and_steps(files)
    assert ids == {checkpoint["wandb_run_id"]}
    assert epochs == [1, 2, 3]
    assert steps == sorted(set(steps)) and steps[-1] == 30  # one increasing step axis over both parts
    assert read_run_file(files[-1]).summary["best/epoch"] == 2


@pytest.mark.slow
def test_crash_after_logging_then_resume_does_not_log_the_epoch_twice(tmp_path):
    """The checkpoint of epoch 2 fails after epoch 2 reached W&B: the resumed job redoes epoch 2 from the
    checkpoint of epoch 1 but must not log it (nor its training steps) again."""
    env = _clean_env(tmp_path, WANDB_DIR=str(tmp_path / "wb"), WANDB_MODE="offline")
    args = ["--output-dir", str(tmp_path / "out"), "--epochs", "3"]
    first = _launch(JOB, [*args, "--stop-after-epoch", "2", "--stop", "crash"], env)
    assert first.returncode != 0
    [part1] = find_run_files(tmp_path / "wb")
    assert [r["epoch"] for r in read_run_file(part1).history_with("val/accuracy")] == [1, 2]
    second = _launch(JOB, args, env)
    assert second.returncode == 0, second.stdout[-4000:]
    files = find_run_files(tmp_path / "wb")
    epochs, steps, ids = _epochs_and_steps(files)
    assert len(files) == 2 and len(ids) == 1
    assert epochs == [1, 2, 3]
    part2 = read_run_file(files[1])
    assert min(r["_step"] for r in part2.history) > 20  # continues after what W&B already holds
    assert steps == sorted(set(steps))
    assert part2.summary["best/val_accuracy"] == 0.8 and part2.summary["epochs_completed"] == 3


@pytest.mark.slow
def test_preempted_run_is_marked_and_continued(tmp_path):
    env = _clean_env(tmp_path, WANDB_DIR=str(tmp_path / "wb"), WANDB_MODE="offline")
    args = ["--output-dir", str(tmp_path / "out"), "--epochs", "3"]
    first = _launch(JOB, [*args, "--stop-after-epoch", "1", "--stop", "preempt"], env)
    assert first.returncode != 0  # torchrun reports a worker's 75 as its own failure
    assert _launch(JOB, args, env).returncode == 0
    files = find_run_files(tmp_path / "wb")
    part1, part2 = (read_run_file(f) for f in files)
    assert part1.preempting and part1.exit_code == 75 and part2.exit_code == 0
    assert part2.run_id == part1.run_id
    epochs, steps, _ = _epochs_and_steps(files)
    assert epochs == [1, 2, 3] and steps == sorted(set(steps))
    assert not part1.history_with("best/confusion_matrix_table")  # only a finished run has the final chart
    assert part2.history_with("best/confusion_matrix_table")


@pytest.mark.slow
def test_unreachable_wandb_in_online_mode_warns_and_training_completes(tmp_path):
    online_key = "0123456789abcdefONLINEKEYMARKER012345678"  # 40 characters, like a real API key
    env = _clean_env(tmp_path, WANDB_DIR=str(tmp_path / "wb"), WANDB_MODE="online", WANDB_API_KEY=online_key,
                     WANDB_BASE_URL="http://127.0.0.1:9",  # nothing listens there: connection refused
                     WANDB_INIT_TIMEOUT="3", WANDB_HTTP_TIMEOUT="2")
    result = _launch(JOB, ["--output-dir", str(tmp_path / "out"), "--epochs", "2"], env, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "W&B init failed" in result.stdout and "training continues" in result.stdout
    checkpoint = json.loads((tmp_path / "out" / "checkpoint.json").read_text())
    assert [r["epoch"] for r in checkpoint["history"]] == [1, 2] and len(checkpoint["wandb_run_id"]) == 8
    assert online_key not in result.stdout
    for file, data in _all_files_bytes(tmp_path):
        assert online_key.encode() not in data, file


class _RejectingServer(http.server.BaseHTTPRequestHandler):
    """Answers every request like a W&B server that does not accept the API key."""

    def _reject(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b'{"errors": [{"message": "permission denied"}]}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _reject

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.slow
def test_rejected_credentials_warn_and_training_completes(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RejectingServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = _clean_env(tmp_path, WANDB_DIR=str(tmp_path / "wb"), WANDB_API_KEY="f" * 40,
                         WANDB_BASE_URL=f"http://127.0.0.1:{server.server_address[1]}")
        result = _launch(JOB, ["--output-dir", str(tmp_path / "out"), "--epochs", "1"], env, nproc=1)
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stdout[-4000:]
    # Credentials are configured, so the default mode is online; the server refuses them.
    # `in`, not startswith: under load another process's output can share the line (seen once in CI).
    warnings = [line for line in result.stdout.splitlines() if "W&B init failed" in line]
    assert warnings, result.stdout[-4000:]
    warning = warnings[0]
    assert "401" in warning and "permission denied" in warning and "training continues" in warning
    assert json.loads((tmp_path / "out" / "checkpoint.json").read_text())["history"][0]["epoch"] == 1


# ---------------------------------------------------------------------------------------------------------
# the recipe end to end


RECIPE = ROOT / "recipes" / "classify.py"


def _recipe_checkpoint_run_id(out: Path) -> str:
    states = sorted(out.glob("checkpoints/step-*/trainer_state.json"))
    return json.loads(states[-1].read_text())["extra"]["wandb_run_id"]


@pytest.mark.slow
def test_recipe_two_processes_offline(tmp_path):
    out = tmp_path / "run"
    env = _clean_env(tmp_path, WANDB_DIR=str(tmp_path / "wb"), WANDB_API_KEY=SECRET, HF_TOKEN=HF_SECRET,
                     SLURM_JOB_ID="99", SLURM_ARRAY_JOB_ID="98", SLURM_ARRAY_TASK_ID="1")
    result = _launch(RECIPE, ["--epochs", "2", "--output-dir", str(out), "--wandb-mode", "offline",
                              "--wandb-group", "ci", "--wandb-tags", "digits,ddp", "--log-every", "5"], env)
    assert result.returncode == 0, result.stdout[-4000:]
    [path] = find_run_files(tmp_path / "wb")
    run = read_run_file(path)
    assert run.run_id == _recipe_checkpoint_run_id(out)
    assert run.group == "ci" and run.tags == ["digits", "ddp"] and run.name == "run"
    config = TrainConfig().to_dict()
    assert set(config) <= set(run.config)
    assert run.config["world_size"] == 2 and run.config["slurm_job_id"] == 99
    assert run.config["class_names"] == [str(i) for i in range(10)]  # what the confusion matrix is labelled with
    for key in ("num_nodes", "procs_per_node", "mixed_precision", "distributed_type", "run_dataset",
                "num_classes", "seed", "slurm_array_job_id", "slurm_array_task_id"):
        assert key in run.config, key
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert run.config.get("git_commit") == (head.stdout.strip() if head.returncode == 0 else None)
    rows = read_metrics(out)
    val = run.history_with("val/accuracy")
    assert [r["epoch"] for r in val] == [1, 2]
    assert [r["_step"] for r in val] == [r["step"] for r in rows]
    assert [r["val/accuracy"] for r in val] == [r["val_accuracy"] for r in rows]
    train_steps = [r["_step"] for r in run.history_with("train/loss")]
    assert train_steps and all(s % 5 == 0 for s in train_steps)
    picked = max(rows, key=lambda r: r["val_accuracy"])  # the first of ties, as --best-metric picks
    assert {k: run.summary[f"best/{k}"] for k in ("epoch", "val_accuracy", "val_loss", "train_loss")} == {
        k: picked[k] for k in ("epoch", "val_accuracy", "val_loss", "train_loss")}
    assert list(path.parent.glob("files/media/table/best/confusion_matrix*.json"))
    for file, data in _all_files_bytes(tmp_path):
        assert SECRET.encode() not in data and HF_SECRET.encode() not in data, file


@pytest.mark.slow
def test_recipe_killed_and_resumed_continues_the_same_run(tmp_path):
    out = tmp_path / "run"
    env = _clean_env(tmp_path, WANDB_DIR=str(tmp_path / "wb"))
    args = ["--epochs", "4", "--output-dir", str(out), "--batch-size", "16", "--log-every", "10"]
    proc = start(args, 2, env=env)
    try:
        assert wait_for(lambda: any(out.glob("checkpoints/step-*/manifest.json")), 180, proc), \
            "no checkpoint before the process ended"
        signal_tree(proc.pid, signal.SIGKILL)
    finally:
        proc.communicate(timeout=60)
    killed_id = _recipe_checkpoint_run_id(out)
    result = _launch(RECIPE, args, env)
    assert result.returncode == 0, result.stdout[-4000:]
    files = find_run_files(tmp_path / "wb")
    assert len(files) == 2
    epochs, steps, ids = _epochs_and_steps(files)
    assert ids == {killed_id}
    assert epochs == [1, 2, 3, 4]  # each once, however much of the killed part wandb-core had flushed
    assert steps == sorted(set(steps))
    rows = read_metrics(out)
    assert read_run_file(files[-1]).summary["best/val_accuracy"] == max(r["val_accuracy"] for r in rows)


def test_a_checkpoint_downloaded_from_wandb_is_named_as_its_artifact():
    from launcher.tracking.tracker import artifact_of

    assert artifact_of(Path("/w/artifacts/model-abc123:v3/step-00000046")) == "model-abc123:v3"
    assert artifact_of(Path("artifacts/model-abc123:best")) == "model-abc123:best"
    assert artifact_of(Path("/w/runs/x/checkpoints/best")) is None
