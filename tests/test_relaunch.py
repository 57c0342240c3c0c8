"""Relaunching a run with other flags (docs/relaunch.md): what applies, what is refused, finished runs stay
finished, diverged runs fail, bad flags fail before anything is written, rank 0 decides what to resume.

One 1-epoch run (seed 1, checkpoints at steps 10, 20 and 23) is trained once; each test relaunches a copy.
"""

import functools
import importlib.util
import json
import math
import shutil
import subprocess
import sys
import time

import pytest

from launcher.checkpoint import STALE_VIEW_ENV, list_checkpoints
from launcher.errors import EXIT_DIVERGED
from tests.helpers import RECIPE, ROOT, assert_same_weights, final_weights, make_env, read_metrics, run

pytestmark = pytest.mark.slow

# digits: 1438 training samples, 64 per step: 23 steps an epoch on one process, 12 on two.
BASE = ["--epochs", "1", "--seed", "1", "--save-every-steps", "10", "--keep-last", "5"]


@functools.cache
def recipe_main():
    """recipes/classify.py's main, in this process: flag checks are timed without the imports."""
    spec = importlib.util.spec_from_file_location("classify_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def python_recipe(args, **env):
    """The recipe as one plain process (no accelerate launch): its own exit code comes back."""
    return subprocess.run([sys.executable, str(RECIPE), *args], env=make_env(**env), cwd=ROOT,
                          capture_output=True, text=True, timeout=180)


def train(args):
    """One training launch as a plain process; returns its output (stdout then stderr)."""
    result = python_recipe(args)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout + result.stderr


def snapshot(folder):
    """Every file under `folder` with its size and modification time: what 'nothing written' compares."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    train([*BASE, "--output-dir", str(out)])
    assert list_checkpoints(out) == ["step-00000010", "step-00000020", "step-00000023"]
    return out


@pytest.fixture
def copy_of(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out, symlinks=True)
    return out


def test_more_epochs_on_a_finished_run_train_with_a_replanned_schedule(finished, copy_of):
    output = train(["--epochs", "2", "--output-dir", str(copy_of)])  # the seed comes from the checkpoint
    notices = [line for line in output.splitlines() if line.startswith("relaunch:")]
    assert notices[0] == "relaunch: --epochs 1 -> 2 (applies from now on)", output
    assert len(notices) == 2 and "re-planned to end at step 46 (it ended at step 23)" in notices[1]
    assert "the LR goes from 0 to 0.0005" in notices[1]  # half-way down the new cosine, not stuck at 0
    rows = read_metrics(copy_of)
    assert [r["step"] for r in rows] == [23, 46] and rows[1]["val_loss"] < rows[0]["val_loss"]
    before, after = final_weights(finished), final_weights(copy_of)
    assert any((before[k] != after[k]).any() for k in before), "epoch 2 did not change the weights"


def test_an_unchanged_relaunch_of_a_finished_run_changes_nothing(copy_of):
    before, metrics = snapshot(copy_of), (copy_of / "metrics.jsonl").read_text()
    output = train([*BASE, "--output-dir", str(copy_of)])
    assert "nothing to do" in output and "relaunch with --epochs more than 1" in output
    after = snapshot(copy_of)
    for name in [n for n in before if n.startswith(("final/", "checkpoints/"))]:
        assert after[name] == before[name], f"{name} was rewritten"
    assert (copy_of / "metrics.jsonl").read_text() == metrics


def test_batch_size_changes_at_an_epoch_boundary(copy_of):
    output = train(["--epochs", "2", "--batch-size", "32", "--output-dir", str(copy_of)])
    assert "relaunch: --batch-size 64 -> 32 (applies from the next epoch, the LR schedule re-planned)" in output
    assert "re-planned to end at step 68" in output  # 23 steps done + ceil(1438 / 32)
    assert [r["step"] for r in read_metrics(copy_of)] == [23, 68]
    assert json.loads((copy_of / "config.json").read_text())["config"]["batch_size"] == 32


@pytest.mark.parametrize("args,needle", [
    (["--val-fraction", "0.3"], "--val-fraction 0.3 differs from 0.2 stored in"),
    (["--seed", "0"], "--seed 0 differs from 1 stored in"),
    (["--model", "cnn"], "--model cnn differs from mlp stored in"),
    (["--lr", "0.01"], "--lr 0.01 differs from 0.001 stored in"),
    (["--resume", "CKPT/step-00000020", "--batch-size", "32"], "--batch-size 32 differs from 64 stored in"),
], ids=["val-fraction", "seed", "model", "lr", "batch-size-mid-epoch"])
def test_a_relaunch_refuses_changes_it_cannot_apply(copy_of, capsys, args, needle):
    args = [a.replace("CKPT", str(copy_of / "checkpoints")) for a in args]
    before = snapshot(copy_of)
    main = recipe_main()
    started = time.perf_counter()
    code = main([*args, "--output-dir", str(copy_of)])
    elapsed = time.perf_counter() - started
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert "new --output-dir" in err[0]
    assert snapshot(copy_of) == before
    assert elapsed < 2.0, f"refused after {elapsed:.1f}s"


def test_eval_only_scores_the_split_the_checkpoint_was_validated_on(finished, tmp_path):
    """Trained with --seed 1; evaluated without it: the stored seed carves the same validation rows."""
    ckpt = finished / "checkpoints" / "step-00000023"
    result = python_recipe(["--eval-only", "--resume", str(ckpt), "--output-dir", str(tmp_path / "eval")])
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads((tmp_path / "eval" / "eval.json").read_text())
    trained = read_metrics(finished)[-1]
    assert got["val_confusion_matrix"] == trained["val_confusion_matrix"]
    assert got["val_accuracy"] == trained["val_accuracy"] and got["val_samples"] == 359
    assert got["class_names"] == [str(i) for i in range(10)]
    assert json.loads((finished / "config.json").read_text())["run_info"]["class_names"] == got["class_names"]


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(finished, copy_of):
    older = copy_of / "checkpoints" / "step-00000010"
    output = train(["--resume", str(older), "--save-every-steps", "7", "--output-dir", str(copy_of)])
    assert "2 newer checkpoint(s) (step-00000020 .. step-00000023) set aside in" in output
    aside = list((copy_of / "checkpoints").glob("abandoned-*"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["step-00000020", "step-00000023"]
    # The new branch alone is in rotation (and what the next --resume auto sees): 14 and 21 are its saves.
    assert list_checkpoints(copy_of) == ["step-00000010", "step-00000014", "step-00000021", "step-00000023"]
    assert (copy_of / "checkpoints" / "best").resolve().name == "step-00000023"
    assert_same_weights(final_weights(copy_of), final_weights(finished))  # the resume itself is exact


def test_two_processes_load_the_checkpoint_rank_0_chose(copy_of):
    """Rank 1 is made to see no checkpoint (a stale shared-file-system view): it must follow rank 0, on a
    world size that also re-plans the schedule (12 steps an epoch on 2 processes instead of 23)."""
    result = run(["--epochs", "2", "--output-dir", str(copy_of)], nproc=2, env=make_env(**{STALE_VIEW_ENV: "1"}),
                 timeout=150)
    assert "resumed from" in result.stdout and "step-00000023" in result.stdout
    assert "re-planned to end at step 35" in result.stdout
    rows = read_metrics(copy_of)
    assert [(r["step"], r["world_size"]) for r in rows] == [(23, 1), (35, 2)]


# ------------------------------------------------------------------------------ early stopping, divergence

# val_loss falls, so with --best-mode max epoch 2 is no improvement: patience 1 stops the run there.
EARLY = ["--epochs", "4", "--early-stopping-patience", "1", "--best-metric", "val_loss", "--best-mode", "max"]


def test_an_early_stopped_run_stays_finished_and_a_kill_before_final_is_completed(tmp_path):
    out = tmp_path / "early"
    first = train([*EARLY, "--output-dir", str(out)])
    assert "early stopping" in first and [r["epoch"] for r in read_metrics(out)] == [1, 2]
    metrics, weights = (out / "metrics.jsonl").read_text(), final_weights(out)
    state = json.loads((out / "final" / "trainer_state.json").read_text())
    assert state["finished"] == "early-stopped"
    # Killed after its last checkpoint, before final/: the relaunch writes final/ and trains nothing.
    shutil.rmtree(out / "final")
    second = train([*EARLY, "--output-dir", str(out)])
    assert "is finished (it stopped early at epoch 2" in second and "writing final/" in second
    assert_same_weights(final_weights(out), weights)
    assert (out / "metrics.jsonl").read_text() == metrics
    # Relaunched again: final/ is untouched, and the notice says how to train further.
    before = snapshot(out / "final")
    third = train([*EARLY, "--output-dir", str(out)])
    assert "nothing to do" in third and "--early-stopping-patience more than 1" in third
    assert snapshot(out / "final") == before and (out / "metrics.jsonl").read_text() == metrics
    # A higher patience applies: the run trains on (and stops at --epochs 4, patience 3 used up there too).
    fourth = train([*EARLY, "--early-stopping-patience", "3", "--output-dir", str(out)])
    assert "relaunch: --early-stopping-patience 1 -> 3 (applies from now on)" in fourth
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2, 3, 4]


def strict_json(line):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(line, parse_constant=refuse)


def test_a_diverged_run_fails_with_its_own_exit_code(tmp_path):
    out = tmp_path / "nan"
    result = python_recipe(["--lr", "1e6", "--epochs", "2", "--output-dir", str(out)])
    assert result.returncode == EXIT_DIVERGED, result.stderr[-3000:]
    err = [line for line in result.stderr.splitlines() if line.startswith("diverged:")]
    assert len(err) == 1 and "loss is nan at step 23 (epoch 1)" in err[0], result.stderr[-3000:]
    rows = [strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["train_loss"] is None and rows[0]["val_loss"] is None
    assert not (out / "checkpoints").exists() and not (out / "final").exists()  # best cannot point at NaN


# ------------------------------------------------------------------------------ flags checked up front

BAD_FLAGS = [
    (["--best-metric", "val_acc"], "--best-metric"),
    (["--plateau-factor", "5"], "--plateau-factor must be between 0 and 1"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be 0 (no clipping) or positive"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
]


@pytest.mark.parametrize("args,needle", BAD_FLAGS, ids=[a[0] for a, _ in BAD_FLAGS])
def test_bad_flags_fail_at_once_and_write_nothing(tmp_path, capsys, args, needle):
    out = tmp_path / "out"
    main = recipe_main()
    started = time.perf_counter()
    code = main([*args, "--output-dir", str(out)])
    elapsed = time.perf_counter() - started
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not out.exists() and elapsed < 2.0


def test_a_single_class_dataset_is_refused_before_anything_is_written(tmp_path):
    data = tmp_path / "one.csv"
    data.write_text("x1,x2,label\n" + "".join(f"{i},{i * 2},cat\n" for i in range(20)))
    out = tmp_path / "out"
    result = python_recipe(["--dataset", str(data), "--output-dir", str(out)])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "needs at least two" in lines[0], result.stderr
    assert not out.exists()


def test_metrics_lines_are_strict_json():
    from launcher.loop import _json_line

    line = _json_line({"epoch": 1, "loss": math.nan, "acc": math.inf, "nested": [1.0, -math.inf]})
    assert strict_json(line) == {"epoch": 1, "loss": None, "acc": None, "nested": [1.0, None]}
