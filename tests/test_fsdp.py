"""FSDP2 on CPU over gloo (accelerate_configs/cpu_fsdp.yaml): sharded training and sharded checkpoints.

Real `accelerate launch` groups of 1, 2 and 3 processes; every assertion is on the files a run leaves and the
exit of its launcher. The launcher shards the model itself on CPU (launcher.parallel.fsdp), so the checkpoint code
under test (launcher.checkpoint.sharded, torch DCP) is the code GPU runs execute.
"""

import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from launcher.checkpoint import FAULT_ENV, list_checkpoints, read_trainer_state
from launcher.data.sampling import RECORD_ENV, epoch_order
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

# 1438 digits / (16 x 2 processes): 45 steps an epoch; a checkpoint every 7 steps lands mid-epoch and at
# epoch ends. Dropout makes the RNG streams matter.
ARGS = ["--epochs", "2", "--batch-size", "16", "--save-every-steps", "7", "--keep-last", "3", "--lr", "3e-3"]
FSDP_LABEL = "FSDP2 (launcher, CPU/gloo)"
N_TRAIN = 1438  # digits' training split (--val-fraction 0.2)
# FSDP reduce-scatters where DDP all-reduces: the sums happen in another order, so losses agree to rounding.
LOSS_TOLERANCE = 1e-5


def fsdp(args, nproc=2, **kw):
    return run(args, nproc, config="cpu_fsdp", **kw)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_clean")
    result = fsdp([*ARGS, "--output-dir", str(out)])
    return out, result.stdout


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_clean")
    run([*ARGS, "--output-dir", str(out)], nproc=2)
    return out


def test_fsdp_is_reported_sharded_and_matches_ddp(clean, ddp):
    out, stdout = clean
    info = json.loads((out / "config.json").read_text())["run_info"]
    assert info["distributed_type"] == FSDP_LABEL and info["world_size"] == 2
    assert f"distributed: {FSDP_LABEL}, 2 processes" in stdout
    # The checkpoints are sharded, which only happens when the model really is FSDP: never DDP in disguise.
    newest = out / "checkpoints" / list_checkpoints(out)[-1]
    manifest = json.loads((newest / "manifest.json").read_text())
    assert manifest["sharded"] and manifest["world_size"] == 2
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"} <= manifest["files"].keys()
    assert not (newest / "model.safetensors").exists() and not (newest / "optimizer.pt").exists()
    fsdp_rows, ddp_rows = read_metrics(out), read_metrics(ddp)
    assert [r["step"] for r in fsdp_rows] == [r["step"] for r in ddp_rows] == [45, 90]
    for a, b in zip(fsdp_rows, ddp_rows):
        for key in ("train_loss", "val_loss"):
            assert abs(a[key] - b[key]) <= LOSS_TOLERANCE * abs(b[key]), (key, a[key], b[key])
    a, b = final_weights(out), final_weights(ddp)  # final/: the gathered, wrapper-free model
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)
    # Rotation and best work on sharded folders as on plain ones.
    best = (out / "checkpoints" / "best").resolve().name
    assert best == f"step-{max(fsdp_rows, key=lambda r: (r['val_accuracy'], -r['epoch']))['step']:08d}"
    assert list_checkpoints(out) == sorted({"step-00000077", "step-00000084", "step-00000090", best})


def test_kill_during_write_preemption_and_sigkill_then_resume_is_bit_identical(clean, tmp_path):
    out = tmp_path / "run"
    # Rank 1 dies with its shards of step 14 written, before any commit: step 14 never becomes a checkpoint.
    proc = start([*ARGS, "--output-dir", str(out)], 2, config="cpu_fsdp", env=make_env(**{FAULT_ENV: "14"}))
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, output[-3000:]
    assert list_checkpoints(out) == ["step-00000007"], output[-3000:]
    assert (out / "checkpoints" / ".tmp-step-00000014-sharded" / "dcp").is_dir()
    # SIGTERM (preemption) of the whole tree: the ranks agree and save a sharded checkpoint together.
    # (torchrun itself also gets the signal and exits through its SignalException, so its exit code says
    # nothing; the manifest does.)
    before = list_checkpoints(out)[-1]
    proc = start([*ARGS, "--output-dir", str(out)], 2, config="cpu_fsdp")
    reached = wait_for(lambda: list_checkpoints(out)[-1] > before, timeout=300, proc=proc)
    signal_tree(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    newest = out / "checkpoints" / list_checkpoints(out)[-1]
    manifest = json.loads((newest / "manifest.json").read_text())
    assert reached and manifest["reason"] == "preempted" and manifest["sharded"], output[-3000:]
    # SIGKILL the whole tree at a moment after a new checkpoint, mid-epoch.
    before = list_checkpoints(out)[-1]
    proc = start([*ARGS, "--output-dir", str(out)], 2, config="cpu_fsdp")
    reached = wait_for(lambda: list_checkpoints(out)[-1] > before, timeout=300, proc=proc)
    wait_for(lambda: False, timeout=0.2, proc=proc)
    signal_tree(proc.pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=120)
    assert reached and proc.returncode != 0, output[-3000:]
    result = fsdp([*ARGS, "--output-dir", str(out)])
    assert "resumed from" in result.stdout
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert_same_weights(final_weights(out), final_weights(clean[0]))
    assert comparable(read_metrics(out)) == comparable(read_metrics(clean[0]))


def copy_checkpoint(src_run, name, dest_run):
    (dest_run / "checkpoints").mkdir(parents=True)
    shutil.copytree(src_run / "checkpoints" / name, dest_run / "checkpoints" / name)


def assert_continues_from_checkpoint(resumed_rows, clean_rows):
    """Completed, the checkpoint's epochs kept as they were, and training went on from the saved model: the
    resumed epoch's loss is near the uninterrupted run's and far below where a run from scratch starts (the
    global batch differs on another world size, so the rest of the epoch is close to, not equal to, it).
    """
    assert [r["epoch"] for r in resumed_rows] == [r["epoch"] for r in clean_rows]
    assert comparable(resumed_rows[:1]) == comparable(clean_rows[:1])
    first, last = clean_rows[0]["train_loss"], clean_rows[-1]["train_loss"]
    assert abs(resumed_rows[-1]["train_loss"] - last) < 0.25 * (first - last), (resumed_rows, clean_rows)


def assert_interrupted_epoch_seen_once(checkpoint, records):
    """The samples the checkpoint's run consumed before it (the first samples_done of the epoch's order, a
    function of (seed, epoch) alone) and those the resumed run trained in that epoch: the training set, once."""
    saved = read_trainer_state(checkpoint)
    epoch, done = saved["epoch"], saved["samples_done"]
    assert 0 < done < N_TRAIN
    before = epoch_order(N_TRAIN, 0, epoch)[:done].tolist()  # --seed 0
    after = [i for path in records.parent.glob(records.name + ".rank*") for line in path.read_text().splitlines()
             for rec in [json.loads(line)] if rec["epoch"] == epoch and rec["shuffle"] and rec["num_samples"] == N_TRAIN
             for i in rec["ids"]]
    assert sorted(before + after) == list(range(N_TRAIN)), "a sample of the interrupted epoch was skipped or repeated"


@pytest.mark.parametrize("nproc", [3, 1])
def test_resume_on_another_world_size(clean, tmp_path, nproc):
    """A mid-epoch checkpoint written by 2 processes continues on 3 (then 3 -> 2) and on 1."""
    out = tmp_path / "run"
    copy_checkpoint(clean[0], "step-00000084", out)  # 39 of epoch 2's 45 steps done
    records = tmp_path / "samples"
    result = fsdp([*ARGS, "--output-dir", str(out)], nproc, env=make_env(**{RECORD_ENV: str(records)}))
    assert_interrupted_epoch_seen_once(clean[0] / "checkpoints" / "step-00000084", records)
    assert "resumed from" in result.stdout and f"{FSDP_LABEL}, {nproc} processes" in result.stdout
    rows = read_metrics(out)
    assert_continues_from_checkpoint(rows, read_metrics(clean[0]))
    assert rows[-1]["world_size"] == nproc
    newest = out / "checkpoints" / list_checkpoints(out)[-1]
    assert json.loads((newest / "manifest.json").read_text())["world_size"] == nproc
    if nproc == 3:  # the 3-process checkpoint goes on for a third epoch on 2 processes
        result = fsdp([*ARGS, "--epochs", "3", "--output-dir", str(out)], 2)
        assert f"resumed from {newest}" in result.stdout
        rows3 = read_metrics(out)
        assert comparable(rows3[:2]) == comparable(rows) and rows3[-1]["world_size"] == 2
        assert rows3[-1]["train_loss"] < rows[0]["train_loss"]


def test_export_loads_strictly_and_gives_the_same_logits(clean, ddp, tmp_path):
    """One plain process, no process group: a sharded checkpoint becomes one safetensors file."""
    from launcher.data import load_splits
    from launcher.models.builtin import build_model
    from safetensors.torch import load_file

    out = clean[0]
    exported = tmp_path / "model.safetensors"
    proc = subprocess.run([sys.executable, "-m", "launcher", "export", str(out / "checkpoints" / "step-00000090"),
                           str(exported)], env=make_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = load_splits("digits", val_fraction=0.2, seed=0)
    x, _ = data.val.__getitems__(list(range(len(data.val))))
    logits = []
    for weights in (load_file(str(exported)), final_weights(out)):
        model = build_model("mlp", data.input_shape, data.num_classes)
        model.load_state_dict(weights, strict=True)
        with torch.no_grad():
            logits.append(model.eval()(x))
    assert torch.equal(logits[0], logits[1])  # the step-90 checkpoint is the final model
    # A DDP checkpoint exports too, to exactly its model.safetensors.
    proc = subprocess.run([sys.executable, "-m", "launcher", "export", str(ddp), str(tmp_path / "ddp.safetensors")],
                          env=make_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    newest = ddp / "checkpoints" / list_checkpoints(ddp)[-1]
    assert_same_weights(load_file(str(tmp_path / "ddp.safetensors")), load_file(str(newest / "model.safetensors")))


def test_eval_only_on_a_sharded_checkpoint_with_three_processes(clean, tmp_path):
    out = clean[0]
    fsdp(["--eval-only", "--resume", str(out / "checkpoints" / "step-00000090"), "--output-dir", str(tmp_path)], 3)
    got = json.loads((tmp_path / "eval.json").read_text())
    last = read_metrics(out)[-1]
    assert got["world_size"] == 3 and got["val_samples"] == last["val_samples"] == 359
    assert got["val_confusion_matrix"] == last["val_confusion_matrix"]
    assert abs(got["val_loss"] - last["val_loss"]) < 1e-6


def test_ddp_checkpoint_under_fsdp_fails_with_one_line(ddp, tmp_path):
    newest = ddp / "checkpoints" / list_checkpoints(ddp)[-1]
    result = fsdp([*ARGS, "--resume", str(newest), "--output-dir", str(tmp_path / "run")], check=False)
    errors = [line for line in result.stdout.splitlines() if line.startswith("classify.py: error:")]
    assert result.returncode != 0 and len(errors) == 1, result.stdout[-3000:]
    assert "cannot continue an FSDP run" in errors[0]
    assert "exitcode  : 2" in result.stdout  # torchrun's report of the worker's exit code
    assert not (tmp_path / "run").exists()


def test_sharded_checkpoint_resumes_under_ddp(clean, tmp_path):
    """The reverse works: DCP loads the shards into a plain DDP model and its optimizer."""
    out = tmp_path / "run"
    copy_checkpoint(clean[0], "step-00000084", out)
    result = run([*ARGS, "--output-dir", str(out)], nproc=2)
    assert "resumed from" in result.stdout
    assert_continues_from_checkpoint(read_metrics(out), read_metrics(clean[0]))
    assert (out / "checkpoints" / list_checkpoints(out)[-1] / "model.safetensors").is_file()


@pytest.mark.parametrize("env,needle", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "asks for FSDP but accelerate set up NO"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "set fsdp_config.fsdp_version: 2"),
])
def test_fsdp_request_that_cannot_run_exits_2_with_one_line(tmp_path, env, needle):
    """An FSDP request without a process group (plain `python`) never falls back to one unsharded process."""
    proc = subprocess.run([sys.executable, str(RECIPE), "--output-dir", str(tmp_path / "run")],
                          env=make_env(**env), cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()
