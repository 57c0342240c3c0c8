"""Resume on another world size: every sample of the interrupted epoch exactly once (real gloo processes).

The recipe's samplers record the sample ids each rank yields (LAUNCHER_TEST_RECORD_SAMPLES), one JSON line
per batch with its epoch and global position. A run on N processes writes mid-epoch checkpoints; a run on M
resumes one of them; the ids the first run consumed before the checkpoint's `samples_done` plus the ids the
second run trained in that epoch must be the whole training set, each once.

359 training samples (--val-fraction 0.8), 17 per process: on 2 processes 11 steps an epoch (the last
global batch 19 samples, split 10/9); on 3 processes from sample 102 of an epoch, the last global batch has
2 samples, so one rank trains an empty batch while the others train one sample each.
"""

import json
import os

import pytest
from safetensors.torch import load_file

from launcher.checkpoint import read_trainer_state
from launcher.data.sampling import RECORD_ENV
from tests.helpers import ROOT, comparable, make_env, read_metrics, run

pytestmark = pytest.mark.slow

N_TRAIN, N_VAL = 359, 1438
ARGS = ["--epochs", "3", "--batch-size", "17", "--val-fraction", "0.8", "--save-every-steps", "7",
        "--keep-last", "100", "--lr", "3e-3"]
JOB = ROOT / "tests" / "elastic_job.py"


class Run:
    def __init__(self, out, prefix, stdout):
        self.out, self.prefix, self.stdout = out, prefix, stdout

    def checkpoint(self, step):
        return self.out / "checkpoints" / f"step-{step:08d}"

    def records(self):
        """Training batches (the shuffled sampler over the training split) of every rank."""
        rows = []
        for path in self.prefix.parent.glob(self.prefix.name + ".rank*"):
            rank = int(path.name.rsplit("rank", 1)[1])
            rows += [{**json.loads(line), "rank": rank} for line in path.read_text().splitlines()]
        return [r for r in rows if r["num_samples"] == N_TRAIN and r["shuffle"]]

    def ids(self, epoch, before=None):
        return [i for r in self.records() if r["epoch"] == epoch and (before is None or r["position"] < before)
                for i in r["ids"]]


def launch(tmp, name, args, nproc):
    out, prefix = tmp / name, tmp / f"{name}-samples"
    result = run([*args, "--output-dir", str(out)], nproc=nproc, env=make_env(**{RECORD_ENV: str(prefix)}))
    return Run(out, prefix, result.stdout)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("two"), "run", ARGS, 2)


@pytest.fixture(scope="module")
def two_to_three(two, tmp_path_factory):
    """Step 14 of the 2-process run is 3 steps (102 samples) into epoch 2; 3 processes continue it."""
    return launch(tmp_path_factory.mktemp("three"), "run", [*ARGS, "--resume", str(two.checkpoint(14))], 3)


def assert_epoch_once(before_run, after_run, epoch, samples_done):
    before = before_run.ids(epoch, before=samples_done)
    after = after_run.ids(epoch)
    assert len(before) == samples_done
    assert sorted(before + after) == list(range(N_TRAIN)), "a sample was skipped or seen twice"


def test_two_to_three_processes_sees_every_sample_once(two, two_to_three):
    state = read_trainer_state(two.checkpoint(14))
    assert (state["epoch"], state["samples_done"], state["world_size"]) == (1, 102, 2)
    assert "the global batch is 51 samples (17 per process, was 34)" in two_to_three.stdout
    assert_epoch_once(two, two_to_three, 1, 102)
    assert sorted(two_to_three.ids(2)) == list(range(N_TRAIN))
    last = [r for r in two_to_three.records() if r["epoch"] == 1 and r["position"] == 102 + 5 * 51]
    assert sorted(len(r["ids"]) for r in last) == [0, 1, 1], "the 2-sample last batch on 3 ranks"
    rows = read_metrics(two_to_three.out)
    assert comparable(rows[:1]) == comparable(read_metrics(two.out)[:1])
    # The partial epoch's statistics of the 2 saved ranks are carried over once, not per new rank.
    assert [r["train_samples"] for r in rows] == [N_TRAIN] * 3
    assert [r["world_size"] for r in rows] == [2, 3, 3] and [r["val_samples"] for r in rows] == [N_VAL] * 3


def test_three_to_two_processes_sees_every_sample_once(two_to_three, tmp_path):
    """Step 21 of the 3-process run: 1 step (51 samples) into epoch 3."""
    ckpt = two_to_three.checkpoint(21)
    assert read_trainer_state(ckpt)["samples_done"] == 51
    resumed = launch(tmp_path, "run", [*ARGS, "--resume", str(ckpt)], 2)
    assert "--batch-size 25 keeps it" not in resumed.stdout  # 51 does not divide by 2: no such hint
    assert_epoch_once(two_to_three, resumed, 2, 51)
    assert [r["train_samples"] for r in read_metrics(resumed.out)] == [N_TRAIN] * 3


def test_two_to_one_process_sees_every_sample_once(two, tmp_path):
    """Step 7 of the 2-process run: 7 steps (238 samples) into epoch 1."""
    resumed = launch(tmp_path, "run", [*ARGS, "--resume", str(two.checkpoint(7))], 1)
    assert "--batch-size 34 keeps it" in resumed.stdout
    assert_epoch_once(two, resumed, 0, 238)
    assert sorted(resumed.ids(1)) == sorted(resumed.ids(2)) == list(range(N_TRAIN))
    assert [r["train_samples"] for r in read_metrics(resumed.out)] == [N_TRAIN] * 3


def test_validation_is_identical_on_one_and_three_processes(two, tmp_path):
    """479 per process: on 3 processes the last global batch is 1 sample (two ranks evaluate nothing)."""
    got = {}
    for nproc in (1, 3):
        out = tmp_path / f"eval{nproc}"
        run(["--eval-only", "--resume", str(two.checkpoint(33)), "--eval-batch-size", "479", "--val-fraction",
             "0.8", "--output-dir", str(out)], nproc=nproc)
        got[nproc] = json.loads((out / "eval.json").read_text())
    assert got[1]["val_samples"] == got[3]["val_samples"] == N_VAL
    assert got[1]["val_confusion_matrix"] == got[3]["val_confusion_matrix"]
    assert got[1]["val_accuracy"] == got[3]["val_accuracy"]
    assert got[1]["val_loss"] == pytest.approx(got[3]["val_loss"], rel=1e-12, abs=1e-12)


def test_uneven_and_empty_shares_weigh_the_gradient_like_one_process(tmp_path):
    """3 processes x 2 samples x 2 accumulated micro-batches train exactly what 1 process x 12 trains:
    19 samples, steps of 12 and 7, the last micro-batch 1 sample (two ranks contribute nothing)."""
    env = make_env(OMP_NUM_THREADS="1")
    run([str(tmp_path / "one.st"), "--samples", "19", "--batch-size", "12"], nproc=1, script=JOB, env=env)
    run([str(tmp_path / "three.st"), "--samples", "19", "--batch-size", "2", "--grad-accum", "2"], nproc=3,
        script=JOB, env=env)
    one, three = load_file(str(tmp_path / "one.st")), load_file(str(tmp_path / "three.st"))
    for key in one:
        assert (one[key] - three[key]).abs().max() < 1e-12, key
    assert os.path.getsize(tmp_path / "one.st") > 0
