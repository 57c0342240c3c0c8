"""The recipe on each problem type: the type detected from the label column, trained in 2 processes, its
checkpoint evaluated on 1 and 3 processes with the same metrics, and --predictions recomputed with
scikit-learn giving the reported metrics; a CNN on images with a float target and with tags; bad input in one
line."""

import json
import signal
import subprocess
import sys

import datasets
import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm
from sklearn.datasets import load_diabetes
from sklearn.preprocessing import MultiLabelBinarizer

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


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    load_diabetes(as_frame=True).frame.to_csv(folder / "diabetes.csv", index=False)  # ships with scikit-learn
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6))
    labels = [[int(i) for i in np.flatnonzero(row[:4] > 0.3)] for row in x]
    features = datasets.Features({**{f"f{i}": datasets.Value("float64") for i in range(6)},
                                  "labels": datasets.Sequence(datasets.ClassLabel(names=list("abcd")))})
    datasets.Dataset.from_dict({**{f"f{i}": x[:, i] for i in range(6)}, "labels": labels},
                               features=features).save_to_disk(str(folder / "multi"))
    pd.DataFrame({"a": [0.1, 0.2, 0.3, 0.4], "b": [1.0, 0.0, 1.0, 0.0], "label": ["x", "y", "x", "y"]}).to_csv(
        folder / "strings.csv", index=False)
    (folder / "bad_ids.jsonl").write_text("".join(json.dumps({"a": i * 0.1, "labels": [0, -1] if i == 3 else [i % 2]})
                                                  + "\n" for i in range(8)))
    return folder


# 3 epochs of ~23 steps on 2 processes, a checkpoint every 5: long enough to be killed mid-run.
COMMON = ["--epochs", "3", "--batch-size", "8", "--lr", "1e-2", "--save-every-steps", "5", "--keep-last", "2"]


@pytest.fixture(scope="module", params=["regression", "multi_label"])
def evaluated(request, data, tmp_path_factory):
    """One training run in 2 processes (its last validation: the 2-process evaluation), then --eval-only
    --predictions of its checkpoint on 1, 2 and 3 processes."""
    dataset = data / ("diabetes.csv" if request.param == "regression" else "multi")
    out = tmp_path_factory.mktemp(request.param)
    trained = run(["--dataset", str(dataset), "--output-dir", str(out / "train"), *COMMON], nproc=2)
    evals = {}
    for nproc in (1, 2, 3):
        target = out / f"eval{nproc}"
        run(["--dataset", str(dataset), "--eval-only", "--resume", str(out / "train" / "checkpoints" / "best"),
             "--output-dir", str(target), "--predictions", str(target / "predictions.parquet")], nproc=nproc)
        evals[nproc] = (json.loads((target / "eval.json").read_text()),
                        pd.read_parquet(target / "predictions.parquet"))
    rows = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    best = json.loads((out / "train" / "checkpoints" / "best" / "trainer_state.json").read_text())["best_epoch"]
    rows = [r for r in rows if r["epoch"] <= best]  # rows[-1]: the epoch checkpoints/best holds
    return request.param, trained.stdout, rows, evals, dataset, out / "train"


def _close(a, b):
    """Metrics of the same checkpoint on other world sizes: every sample's forward pass is the same to the bit
    (evaluation batches keep their shape), so only the order of float64 sums can differ."""
    for key, value in a.items():
        if isinstance(value, float):
            assert value == pytest.approx(b[key], rel=1e-12, abs=1e-12), key
        elif key not in ("world_size",):
            assert value == b[key], key


@pytest.mark.slow
def test_each_problem_type_trains_evaluates_the_same_anywhere_and_predictions_give_its_metrics(evaluated, tmp_path):
    kind, stdout, rows, evals, dataset, trained = evaluated
    expected_type = {"regression": "regression", "multi_label": "multi_label_classification"}[kind]
    assert f"problem type: {expected_type} (" in stdout
    assert rows and (kind != "regression" or not any("accuracy" in k for k in rows[-1]))  # never for a regression
    one, predictions = evals[1]
    for nproc in (2, 3):
        _close(evals[nproc][0], one)
        pd.testing.assert_frame_equal(evals[nproc][1], predictions, check_exact=True)  # bit for bit
    n = one["val_samples"]
    assert predictions["index"].tolist() == list(range(n))  # every sample once, in the split's order
    assert one["problem_type"] == expected_type
    # the best epoch's validation (2 processes) is its checkpoint's evaluation on 1 and 3
    for key, value in one.items():
        if key.startswith("val_") and isinstance(value, float):
            assert value == pytest.approx(rows[-1][key], rel=1e-12, abs=1e-12), key
    if kind == "regression":
        y, p = predictions["label"].to_numpy(), predictions["prediction"].to_numpy()
        assert one["val_loss"] == pytest.approx(skm.mean_squared_error(y, p), rel=1e-9)
        assert one["val_mae"] == pytest.approx(skm.mean_absolute_error(y, p), rel=1e-9)
        assert one["val_r2"] == pytest.approx(skm.r2_score(y, p), rel=1e-9)
        assert abs(y.mean() - 150) < 20  # original units, not standardized
    else:
        binarize = MultiLabelBinarizer(classes=range(4))
        y, p = binarize.fit_transform(predictions["label"]), binarize.transform(predictions["prediction"])
        assert one["val_f1_micro"] == pytest.approx(skm.f1_score(y, p, average="micro", zero_division=0), rel=1e-9)
        assert one["val_f1_macro"] == pytest.approx(skm.f1_score(y, p, average="macro", zero_division=0), rel=1e-9)
        assert one["val_exact_match"] == pytest.approx(skm.accuracy_score(y, p), rel=1e-9)
        assert len(predictions["probabilities"][0]) == 4
        names = one["class_names"]  # besides the ids, their class names
        for key in ("label", "prediction"):
            assert [list(v) for v in predictions[f"{key}_names"]] == [[names[i] for i in ids]
                                                                       for ids in predictions[key]], key
        target = tmp_path / "new.parquet"  # launcher predict names them too
        done = subprocess.run([sys.executable, "-m", "launcher", "predict", str(trained), str(dataset), "--output",
                               str(target)], env=make_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr
        new = pd.read_parquet(target)
        assert list(new.columns) == ["index", "label", "prediction", "probabilities", "prediction_names"]
        assert [list(v) for v in new["prediction_names"]] == [[names[i] for i in ids] for ids in new["prediction"]]
        assert any(len(v) for v in new["prediction_names"])


@pytest.mark.slow
def test_each_problem_type_resumes_bit_identical_after_sigkill(evaluated, tmp_path):
    """Killed after its first checkpoint, resumed with --resume auto: the weights and every metrics row of
    the uninterrupted run (the task's partial-epoch statistics are in the checkpoint)."""
    _, _, _, _, dataset, clean = evaluated
    args = ["--dataset", str(dataset), "--output-dir", str(tmp_path), *COMMON]
    proc = start(args, nproc=2)
    reached = wait_for(lambda: (tmp_path / "checkpoints").exists() and any(
        p.name.startswith("step-") for p in (tmp_path / "checkpoints").iterdir()), timeout=120, proc=proc)
    signal_tree(proc.pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=120)
    assert reached and proc.returncode != 0, output[-3000:]
    result = run(args, nproc=2)
    assert "resumed from" in result.stdout
    assert_same_weights(final_weights(tmp_path), final_weights(clean))
    assert comparable(read_metrics(tmp_path)) == comparable(read_metrics(clean))


BAD = [
    (["--dataset", "{data}/strings.csv", "--problem-type", "regression"],
     "--problem-type regression needs numbers in label column 'label', which holds text values"),
    (["--dataset", "{data}/bad_ids.jsonl", "--label-column", "labels"], "holds class id -1"),
    (["--dataset", "{data}/diabetes.csv", "--best-metric", "val_accuracy"],
     "Monitor metric 'val_accuracy' is not a metric; choose one of val_loss, val_mae, val_rmse, val_r2"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=["regression-on-strings", "unknown-id", "monitor"])
def test_bad_task_input_is_one_line_exit_2_and_touches_nothing(data, tmp_path, args, needle):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    args = [a.format(data=data) for a in args]
    proc = subprocess.run([sys.executable, str(RECIPE), *args, "--output-dir", str(out)], env=make_env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert needle in lines[0] and lines[0].startswith("classify.py: error:"), lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.fixture(scope="module")
def digit_images(tmp_path_factory):
    """The embedded digits' 8x8 images with two other label columns: the digit's value as a float
    (regression) and which of even / at least 5 / prime it is (multi-label, Sequence(ClassLabel))."""
    from launcher.data.sources import digits_arrays

    images, digits = digits_arrays()
    tags = [[t for t, ok in enumerate((d % 2 == 0, d >= 5, d in (2, 3, 5, 7))) if ok] for d in digits]
    names = ["even", "at least 5", "prime"]
    features = datasets.Features({"image": datasets.Array2D(shape=(8, 8), dtype="float32"),
                                  "value": datasets.Value("float32"),
                                  "tags": datasets.Sequence(datasets.ClassLabel(names=names))})
    folder = tmp_path_factory.mktemp("digit-images") / "data"
    datasets.Dataset.from_dict({"image": (images / 16).astype(np.float32), "value": digits.astype(np.float32),
                                "tags": tags}, features=features).save_to_disk(str(folder))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("column,problem,metric,floor", [("value", "regression", "val_r2", 0.5),
                                                          ("tags", "multi_label_classification", "val_f1_micro", 0.8)])
def test_image_models_learn_regression_and_multi_label_targets(digit_images, tmp_path, column, problem, metric, floor):
    """Not only tables: a CNN on images, 2 processes, for a float target and for lists of tags."""
    out = tmp_path / "run"
    result = run(["--dataset", str(digit_images), "--label-column", column, "--model", "cnn", "--epochs", "3",
                  "--output-dir", str(out)], nproc=2)
    assert f"problem type: {problem}" in result.stdout
    row = read_metrics(out)[-1]
    assert row[metric] > floor and row["world_size"] == 2 and "val_accuracy" not in row, row
