"""Callbacks on `fit`: hook order and counts, their state in every checkpoint, EMA resumed bit-identical after
SIGKILL on 2 processes, and a custom step's model attributes under DDP (real processes, real kills)."""

import json
import shutil
import signal

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from launcher import Callback, Checkpointing, fit
from launcher.checkpoint import list_checkpoints, validate
from tests.helpers import (
    ROOT,
    assert_same_weights,
    comparable,
    final_weights,
    read_metrics,
    run,
    signal_tree,
    start,
    wait_for,
)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def blobs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    return TensorDataset(torch.randn(n, 4, generator=g) + nn.functional.one_hot(y, 4).float() * 2, y)


class Counter(Callback):
    """Records every hook; its state is a JSON count and a tensor total."""

    def __init__(self):
        self.events, self.steps, self.total = [], 0, torch.zeros(2, dtype=torch.float64)

    def on_train_start(self, run):
        assert not isinstance(run.model, nn.parallel.DistributedDataParallel)
        self.events.append(("start", run.global_step))

    def on_step_end(self, run):
        self.steps += 1
        self.total += torch.tensor([1.0, run.global_step], dtype=torch.float64)
        self.events.append(("step", run.global_step))

    def on_validation_end(self, run, row):
        row["val_counter"] = self.steps
        self.events.append(("val", row["epoch"]))

    def on_save(self, run):
        self.events.append(("save", run.global_step))
        return super().on_save(run)

    def on_load(self, run, state):
        self.events.append(("load", state["steps"]))
        super().on_load(run, state)

    def on_train_end(self, run):
        self.events.append(("end", run.global_step))

    def state_dict(self):
        return {"steps": self.steps, "total": self.total.clone()}

    def load_state_dict(self, state):
        self.steps, self.total = state["steps"], state["total"].clone()


def train(tmp_path, counter, resume_from=None):
    set_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    # 101 samples in batches of 10: 11 optimizer steps an epoch, the last one of a single sample.
    return fit(model, torch.optim.SGD(model.parameters(), lr=0.05), DataLoader(blobs(101), batch_size=10),
               DataLoader(blobs(37, seed=1), batch_size=16), nn.CrossEntropyLoss(), epochs=2, num_classes=3,
               progress=False, callbacks=[counter],
               checkpointing=Checkpointing(tmp_path, save_every_steps=5, keep_last=10, resume_from=resume_from))


def test_hooks_run_in_order_and_their_state_is_checkpointed_and_restored(tmp_path):
    counter = Counter()
    history = train(tmp_path, counter)
    expected = [("start", 0)]
    for step in range(1, 23):
        expected.append(("step", step))
        if step in (11, 22):
            expected += [("val", step // 11), ("save", step)]
        elif step % 5 == 0:
            expected.append(("save", step))
    expected.append(("end", 22))
    assert counter.events == expected
    assert [row["val_counter"] for row in history] == [11, 22]
    assert [row["val_counter"] for row in read_metrics(tmp_path)] == [11, 22]  # recorded with the row
    for name in list_checkpoints(tmp_path):  # every checkpoint: the tensors listed and hashed, the JSON state
        folder = tmp_path / "checkpoints" / name
        step = int(name.split("-")[1])
        assert set(validate(folder)["files"]["callbacks.safetensors"]) == {"size", "sha256"}
        assert load_file(folder / "callbacks.safetensors")["Counter/total"].tolist() == [
            step, step * (step + 1) / 2]
        assert json.loads((folder / "trainer_state.json").read_text())["extra"]["callbacks"] == {
            "Counter": {"steps": step}}
    # A resume restores exactly what was saved, after on_train_start, before the first step.
    resumed = Counter()
    train(tmp_path, resumed, resume_from=tmp_path / "checkpoints" / "step-00000015")
    assert resumed.events[:3] == [("start", 15), ("load", 15), ("step", 16)]
    assert resumed.steps == 22 and resumed.total.tolist() == counter.total.tolist()


def test_a_user_step_sees_the_model_itself_on_one_process():
    seen = []

    def step(model, batch):
        from launcher import StepOutput

        seen.append(model)
        x, y = batch
        return StepOutput(nn.functional.cross_entropy(model(x), y, reduction="none"))

    set_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    fit(model, torch.optim.SGD(model.parameters(), lr=0.05), DataLoader(blobs(21), batch_size=10),
        DataLoader(blobs(11), batch_size=16), epochs=1, step=step, progress=False)
    assert seen and all(m is model for m in seen)


def test_ema_decay_out_of_range_is_refused():
    from launcher import EMA

    with pytest.raises(ValueError, match="between 0 and 1"):
        EMA(1.0)


# ---------------------------------------------------------------------------------------------------------
# Real processes

# The recipe's MLP slowed down by 50 ms a step (no number changes), so a kill lands mid-epoch: 1438 digits /
# 2 processes / 32 = 23 steps an epoch, a checkpoint every 5.
EMA_ARGS = ["--ema", "0.99", "--epochs", "2", "--batch-size", "32", "--save-every-steps", "5", "--keep-last", "2",
            "--lr", "3e-3", "--model", "tests.slurm.slow_model:build"]


def newest_step(out):
    names = list_checkpoints(out)
    return int(names[-1].split("-")[1]) if names else -1


@pytest.mark.slow
def test_ema_sigkilled_and_resumed_on_two_processes_is_bit_identical(tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    run([*EMA_ARGS, "--output-dir", str(clean)], nproc=2)
    proc = start([*EMA_ARGS, "--output-dir", str(killed)], nproc=2)
    reached = wait_for(lambda: newest_step(killed) >= 5, timeout=120, proc=proc)
    signal_tree(proc.pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=60)
    assert reached and proc.returncode != 0, output[-3000:]
    assert 0 < newest_step(killed) < 46, "the kill landed mid-run"
    result = run([*EMA_ARGS, "--output-dir", str(killed)], nproc=2)
    assert "resumed from" in result.stdout
    # final/ holds the EMA weights, the last checkpoint the training weights and the EMA beside them.
    assert_same_weights(final_weights(killed), final_weights(clean))
    last = [out / "checkpoints" / list_checkpoints(out)[-1] for out in (clean, killed)]
    ema = [load_file(folder / "callbacks.safetensors") for folder in last]
    assert_same_weights(*ema)
    assert_same_weights({f"ema/{k}": v for k, v in final_weights(clean).items()}, ema[0])
    trained = load_file(last[0] / "model.safetensors")
    assert any(not torch.equal(trained[k], v) for k, v in final_weights(clean).items())
    rows = comparable(read_metrics(killed))
    assert rows == comparable(read_metrics(clean))
    assert all(0.5 < row["val_ema_accuracy"] <= 1.0 for row in rows)


FSDP_EMA_ARGS = ["--ema", "0.99", "--epochs", "2", "--batch-size", "32", "--save-every-steps", "5", "--keep-last",
                 "2", "--lr", "3e-3"]


@pytest.mark.slow
def test_ema_under_fsdp2_sigkilled_resumed_and_resharded(tmp_path):
    """FSDP2 on 2 processes: each rank averages its own shards, the EMA rides in the DCP checkpoint; SIGKILL and
    --resume auto end bit-identical (EMA weights and metrics); final/ is the gathered EMA; a 2-process
    checkpoint continues on 3 processes (DCP reshards the EMA)."""
    from launcher.checkpoint.sharded import CALLBACKS_KEY, model_weights

    clean, killed, wider = tmp_path / "clean", tmp_path / "killed", tmp_path / "wider"
    slow = ["--model", "tests.slurm.slow_model:build"]
    run([*FSDP_EMA_ARGS, *slow, "--output-dir", str(clean)], nproc=2, config="cpu_fsdp")
    proc = start([*FSDP_EMA_ARGS, *slow, "--output-dir", str(killed)], nproc=2, config="cpu_fsdp")
    reached = wait_for(lambda: newest_step(killed) >= 5, timeout=120, proc=proc)
    signal_tree(proc.pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=60)
    assert reached and proc.returncode != 0, output[-3000:]
    assert 0 < newest_step(killed) < 46, "the kill landed mid-run"
    shutil.copytree(killed, wider)  # the same 2-process checkpoint, resumed on 3 below
    result = run([*FSDP_EMA_ARGS, *slow, "--output-dir", str(killed), "--resume", "auto"], nproc=2, config="cpu_fsdp")
    assert "resumed from" in result.stdout
    assert_same_weights(final_weights(killed), final_weights(clean))
    rows = comparable(read_metrics(killed))
    assert rows == comparable(read_metrics(clean))
    assert all(0.5 < row["val_ema_accuracy"] <= 1.0 for row in rows)
    # final/ is the gathered EMA (full shapes), not the last checkpoint's training weights
    last = clean / "checkpoints" / list_checkpoints(clean)[-1]
    ema = model_weights(last, CALLBACKS_KEY)
    assert_same_weights({f"ema/{k}": v for k, v in final_weights(clean).items()}, ema)
    trained = model_weights(last)
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in final_weights(clean).items()}
    assert any(not torch.equal(trained[k], v) for k, v in final_weights(clean).items())
    # 3 processes from the 2-process checkpoint: the EMA loads resharded and the run ends close to the clean one
    result = run([*FSDP_EMA_ARGS, *slow, "--output-dir", str(wider), "--resume", "auto"], nproc=3, config="cpu_fsdp")
    assert "resumed from" in result.stdout
    reference = final_weights(clean)
    for name, tensor in final_weights(wider).items():
        assert torch.isfinite(tensor).all() and tensor.shape == reference[name].shape
        assert torch.allclose(tensor, reference[name], atol=0.1), name
    assert all(0.5 < row["val_ema_accuracy"] <= 1.0 for row in read_metrics(wider) if "val_ema_accuracy" in row)


@pytest.mark.slow
def test_a_user_step_reads_model_attributes_and_trains_in_sync_on_two_processes(tmp_path):
    """`model.scale` of the user's module under DDP, and the call still all-reduces: both ranks end with the
    same weights (with the plain module's forward they would drift apart)."""
    result = run([str(tmp_path)], nproc=2, script=ROOT / "tests" / "callbacks_job.py")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["wrapper"] == "DistributedDataParallel" and report["scale"] == 0.5, result.stdout[-2000:]
    assert report["same_weights_on_every_rank"] and report["ema_updates"] == report["steps"] > 0
