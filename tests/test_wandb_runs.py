"""Runs people compare in W&B: model artifacts, exact training curves, eval runs, sweeps, a quiet console.

The recipe runs for real (offline W&B, `accelerate launch` over gloo) and the `run-<id>.wandb` files it leaves
are read back with launcher.tracking.wandb_records: what `wandb sync` would upload is what is checked. One
2-process training run is shared by the module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from launcher.errors import EXIT_USAGE
from launcher.tracking.tracker import PREDICTIONS_TABLE_ROWS
from launcher.tracking.wandb_records import find_run_files, read_run_file
from tests.helpers import RECIPE, ROOT, read_metrics, run, signal_tree, wait_for

DIGITS_TRAIN = 1438  # digits' training split (val_fraction 0.2)


def _env(home: Path, **extra: str) -> dict:
    """No W&B settings or credentials from the developer's machine, and no TQDM_DISABLE: the console is
    checked as a user sees it with output piped to a file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k not in ("NETRC", "TQDM_DISABLE")}
    env.update({"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
                "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                "NETRC": str(home / "no-netrc"), "WANDB_CONFIG_DIR": str(home / "wandb-config"),
                "WANDB_CACHE_DIR": str(home / "wandb-cache"), "WANDB_DATA_DIR": str(home / "wandb-data")})
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """2 processes x batch 16 = 45 optimizer steps per epoch, logged every 9: five intervals an epoch."""
    home = tmp_path_factory.mktemp("wandb-runs")
    out = home / "run"
    result = run(["--epochs", "2", "--batch_size", "16", "--log-every", "9", "--output-dir", str(out),
                  "--wandb-log-model", "checkpoints"], 2, env=_env(home), timeout=300)
    [path] = find_run_files(out / "wandb")
    return out, home, result.stdout, read_run_file(path)


@pytest.mark.slow
def test_checkpoints_and_final_are_model_artifacts_with_aliases(trained):
    out, _, _, wb = trained
    models = [a for a in wb.artifacts if a["type"] == "model"]
    assert {a["name"] for a in models} == {f"model-{wb.run_id}"}  # one lineage, a version per upload
    rows = read_metrics(out)
    second_is_best = rows[1]["val_accuracy"] > rows[0]["val_accuracy"]
    second = ["best", "latest", "step-90"] if second_is_best else ["latest", "step-90"]
    assert [a["aliases"] for a in models] == [["best", "latest", "step-45"], second, ["final", "latest"]]
    assert "model.safetensors" in models[0]["files"] and "manifest.json" in models[0]["files"]
    assert models[-1]["files"] == sorted(p.name for p in (out / "final").iterdir())
    best_epoch = wb.summary["best/epoch"]
    assert [a["metadata"]["step"] for a in models if "best" in a["aliases"]][-1] == 45 * best_epoch


@pytest.mark.slow
def test_train_loss_is_the_mean_over_every_ranks_samples(trained):
    out, _, _, wb = trained
    rows = read_metrics(out)
    points = wb.history_with("train/loss")
    assert [p["_step"] for p in points] == list(range(9, 91, 9))
    for epoch, row in enumerate(rows):
        # Intervals of 9 global batches of 32, the last one short: weighted by their sample counts, the
        # logged points give the epoch's exact loss over both ranks' samples (rank 0's own would not).
        losses = [p["train/loss"] for p in points[5 * epoch:5 * epoch + 5]]
        counts = [9 * 32] * 4 + [DIGITS_TRAIN - 4 * 9 * 32]
        mean = sum(loss * n for loss, n in zip(losses, counts)) / DIGITS_TRAIN
        assert mean == pytest.approx(row["train_loss"], rel=1e-9)
    assert all(p["train/grad_norm"] > 0 for p in points)
    assert wb.config["model/num_parameters"] == wb.config["model/trainable_parameters"] > 0
    assert wb.config["batch_size"] == 16 and "batch-size" not in wb.config


@pytest.mark.slow
def test_best_is_one_epochs_row(trained):
    out, _, _, wb = trained
    rows = read_metrics(out)
    picked = max(rows, key=lambda r: r["val_accuracy"])
    assert {k: wb.summary[f"best/{k}"] for k in ("epoch", "val_loss", "train_loss", "val_f1")} == \
        {k: picked[k] for k in ("epoch", "val_loss", "train_loss", "val_f1")}


@pytest.mark.slow
def test_the_console_has_our_one_wandb_line_and_no_progress_bar_fragments(trained):
    _, _, stdout, wb = trained
    lines = stdout.splitlines()
    assert not [line for line in lines if line.startswith("wandb:")], stdout
    [ours] = [line for line in lines if line.startswith("W&B:")]
    assert f"offline run {wb.run_id}" in ours and "wandb sync" in ours
    assert "\r" not in stdout and "%|" not in stdout and "it/s]" not in stdout, stdout
    assert sum(line.startswith("epoch ") for line in lines) == 2


@pytest.mark.slow
def test_an_eval_only_run_reaches_wandb_naming_its_checkpoint(trained):
    out, home, _, wb = trained
    eval_dir = home / "eval"
    parquet = eval_dir / "predictions.parquet"
    result = run(["--eval-only", "--resume", str(out / "checkpoints" / "best"), "--output-dir", str(eval_dir),
                  "--predictions", str(parquet)], 1, env=_env(home), timeout=240)
    assert not [line for line in result.stdout.splitlines() if line.startswith("wandb:")], result.stdout
    [path] = find_run_files(eval_dir / "wandb")
    ev = read_run_file(path)
    assert ev.job_type == "eval" and ev.exit_code == 0 and ev.run_id != wb.run_id
    assert ev.config["evaluated_run_id"] == wb.run_id
    assert ev.config["evaluated_checkpoint"] == str((out / "checkpoints" / "best").resolve())
    picked = next(r for r in read_metrics(out) if r["epoch"] == wb.summary["best/epoch"])
    assert ev.summary["val/accuracy"] == pytest.approx(picked["val_accuracy"], abs=1e-12)
    assert list(path.parent.glob("files/media/table/eval/confusion_matrix*.json"))
    # --predictions: its first PREDICTIONS_TABLE_ROWS rows as the `predictions` table, columns as in the parquet
    predictions = pd.read_parquet(parquet)
    [logged] = [row["predictions"] for row in ev.history_with("predictions")]
    assert logged["_type"] == "table-file" and logged["nrows"] == min(len(predictions), PREDICTIONS_TABLE_ROWS)
    table = json.loads((path.parent / "files" / logged["path"]).read_text())
    assert table["columns"] == list(predictions.columns) == ["index", "label", "prediction", "probabilities",
                                                             "label_id", "prediction_id"]  # names, then ids
    assert table["data"] == [[v.tolist() if hasattr(v, "tolist") else v for v in row]
                             for row in predictions.head(PREDICTIONS_TABLE_ROWS).itertuples(index=False)]


def _agent_argv(sweep: dict, args: dict) -> list[str]:
    """The command wandb's agent runs for one trial (wandb_agent.Agent._command_run), built by wandb's own code."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    command = {"args": {name: {"value": value} for name, value in args.items()}}
    sweep_vars = sweep_utils.create_sweep_command_args(command)
    sweep_vars.update(interpreter=["python"], program=[sweep["program"]], env=["/usr/bin/env"])
    argv = []
    for chunk in sweep_utils.create_sweep_command(list(sweep["command"])):
        argv += sweep_vars.get(chunk[2:-1], []) if chunk.startswith("${") else [str(chunk)]
    return argv


@pytest.mark.slow
@pytest.mark.parametrize("sweep_file,nproc", [("classify.yaml", 1), ("classify_ddp.yaml", 2)])
def test_a_sweep_trial_launched_as_the_agent_does_it(tmp_path, sweep_file, nproc):
    """The sweep files of docs/tracking.md, run as the agent runs them (underscore parameter names), from a
    checkout's root; then the agent's early termination (SIGTERM) ends the run as stopped, not preempted."""
    from wandb.sdk.lib import config_util

    sweep = yaml.safe_load((ROOT / "recipes" / "sweeps" / sweep_file).read_text())
    for folder in ("recipes", "accelerate_configs"):
        (tmp_path / folder).symlink_to(ROOT / folder)
    # The sweep's own parameters (first value, lowest of a range), and enough epochs to be stopped mid-run.
    params = {name: spec.get("value", spec.get("values", [spec.get("min")])[0])
              for name, spec in sweep["parameters"].items()}
    params.update(epochs=50, save_every_steps=3)
    sweep_id, run_id = "swp12345", f"trial{nproc}"
    param_path = tmp_path / "wandb" / f"sweep-{sweep_id}" / f"config-{run_id}.yaml"
    config_util.save_config_file_from_dict(str(param_path), {k: {"value": v} for k, v in params.items()})
    argv = _agent_argv(sweep, params)
    assert f"--batch_size={params['batch_size']}" in argv
    env = _env(tmp_path, WANDB_SWEEP_ID=sweep_id, WANDB_RUN_ID=run_id, WANDB_SWEEP_PARAM_PATH=str(param_path),
               WANDB_MODE="offline", PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    out = tmp_path / "runs" / sweep_id / run_id
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        assert wait_for(lambda: any(out.glob("checkpoints/step-*/manifest.json")), 240, proc), proc.stdout.read()
        proc.send_signal(signal.SIGTERM)  # the agent's proc.terminate(): the top process only
        stdout, _ = proc.communicate(timeout=120)
    finally:
        signal_tree(proc.pid, signal.SIGKILL)
    # Under accelerate launch, torchrun forwards the SIGTERM to the workers, waits for them (they save and
    # finish the W&B run, exit 75) and exits 143 itself.
    assert proc.returncode == (75 if nproc == 1 else 128 + signal.SIGTERM), stdout
    [path] = find_run_files(out / "wandb")
    wb = read_run_file(path)
    assert wb.run_id == run_id and wb.config["world_size"] == nproc
    assert {k: wb.config[k] for k in params} == params
    assert not [k for k in wb.config if "-" in k]  # one key per parameter
    assert not wb.preempting and wb.exit_code == 0 and wb.summary["stopped_by"] == "sweep agent"


@pytest.mark.slow
def test_two_launches_in_the_same_second_get_two_folders(tmp_path):
    env = _env(tmp_path, WANDB_MODE="disabled", TQDM_DISABLE="1")
    args = [sys.executable, str(RECIPE), "--epochs", "1"]
    procs = [subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2 and all((f / "final" / "model.safetensors").exists() for f in folders)


def test_a_remote_output_dir_is_refused_and_nothing_is_written(tmp_path):
    proc = subprocess.run([sys.executable, str(RECIPE), "--output-dir", "s3://bucket/run"], env=_env(tmp_path),
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_USAGE
    assert proc.stderr.strip().splitlines() == [
        "classify.py: error: --output-dir s3://bucket/run: remote storage is not supported yet; give a local "
        "(or mounted) folder and copy the run afterwards"]
    assert not any(tmp_path.glob("s3*")) and not (tmp_path / "runs").exists()
