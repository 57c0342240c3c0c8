"""`launcher predict RUN DATA --output FILE`: a run's stored preprocessing (final/preprocessing.json) and its
final weights score new rows exactly as the run's own `--eval-only --predictions` does, on 1 and 2 processes
(each row once, in order); image folders too; bad input is one line and exit 2, with nothing written."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from launcher.checkpoint import list_checkpoints
from tests.helpers import CONFIGS, ROOT, free_port, make_env, run
from tests.test_images import write_folder


def table(n: int, seed: int, colors: list[str]) -> pd.DataFrame:
    """Numeric features with missing values, a string category, and a label that depends on both."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"height": rng.normal(170, 10, n), "weight": rng.normal(70, 15, n),
                       "age": rng.integers(18, 90, n).astype(float), "color": rng.choice(colors, n)})
    df["label"] = np.where(df["weight"] / 70 + df["color"].isin(["red", "purple"]) > 1.3, "high", "low")
    df.loc[rng.choice(n, n // 10, replace=False), "height"] = np.nan
    df.loc[rng.choice(n, n // 20 + 1, replace=False), "age"] = np.nan
    df.loc[rng.choice(n, 3, replace=False), "color"] = None
    return df


def launcher_cmd(args: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "launcher", *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu_ddp.yaml"),
            "--num_processes", str(nproc), "--main_process_port", str(free_port()), "-m", "launcher", *args]


def predict(args: list[str], nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(launcher_cmd(["predict", *args], nproc), env=make_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tables")
    data = root / "data"
    data.mkdir()
    table(301, 0, ["red", "green", "blue", "gold"]).to_csv(data / "train.csv", index=False)
    new = table(41, 1, ["red", "green", "purple"])  # purple: never seen in training
    new.to_csv(data / "validation.csv", index=False)
    out = root / "run"
    done = run(["--dataset", str(data), "--epochs", "2", "--batch-size", "32", "--output-dir", str(out)])
    return data, out, done.stdout


def test_tables_train_and_predict_like_the_runs_own_eval(trained, tmp_path):
    data, out, stdout = trained
    assert ("features: 3 numeric (2 with missing values, filled with training means + indicators), "
            "1 categorical (color: 5 categories + <other>, one-hot) -> 11 inputs") in stdout
    pre = json.loads((out / "final" / "preprocessing.json").read_text())
    assert pre["encoder"]["categories"]["color"] == ["blue", "gold", "green", "red", None]  # training split only
    assert pre["class_names"] == ["high", "low"] and len(pre["mean"]) == 11
    last = out / "checkpoints" / list_checkpoints(out)[-1]
    assert json.loads((last / "trainer_state.json").read_text())["extra"]["preprocessing"] == pre

    evaluated = tmp_path / "eval.parquet"
    run(["--dataset", str(data), "--eval-only", "--resume", str(last), "--output-dir", str(tmp_path / "eval"),
         "--predictions", str(evaluated)])
    expected = pd.read_parquet(evaluated)
    assert list(expected.columns) == ["index", "label", "prediction", "probabilities", "label_id", "prediction_id"]

    one = tmp_path / "one.parquet"
    predict([str(out), str(data / "validation.csv"), "--output", str(one), "--batch-size", "32"])
    got = pd.read_parquet(one)
    assert list(got.columns) == list(expected.columns)
    assert got["index"].tolist() == list(range(41))
    for column in ("label", "prediction", "label_id", "prediction_id"):
        assert got[column].tolist() == expected[column].tolist(), column
    assert set(got["prediction"]) <= {"high", "low"}
    np.testing.assert_allclose(np.stack(got["probabilities"]), np.stack(expected["probabilities"]), atol=1e-6)

    two = tmp_path / "two.parquet"
    predict([str(out), str(data / "validation.csv"), "--output", str(two), "--batch-size", "8"], nproc=2)
    pd.testing.assert_frame_equal(pd.read_parquet(two).drop(columns="probabilities"),
                                  got.drop(columns="probabilities"))
    np.testing.assert_allclose(np.stack(pd.read_parquet(two)["probabilities"]), np.stack(got["probabilities"]),
                               atol=1e-6)


def test_bad_inputs_are_one_line_and_write_nothing(trained, tmp_path):
    data, out, _ = trained
    pd.read_csv(data / "validation.csv").drop(columns=["weight", "label"]).to_csv(tmp_path / "lacks.csv", index=False)
    target = tmp_path / "p.parquet"
    for args, expected in (([str(out), str(tmp_path / "lacks.csv")], "lacks column(s) weight"),
                           ([str(out / "checkpoints"), str(data / "validation.csv")], "holds no preprocessing.json"),
                           ([str(out), str(tmp_path / "nope.csv")], "does not exist")):
        done = predict([*args, "--output", str(target)], check=False)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and expected in lines[0], done.stderr
        assert not target.exists()


def test_an_image_folder_is_predicted_with_the_runs_image_size_and_statistics(tmp_path):
    pics = write_folder(tmp_path / "pics", 63, classes=3)
    out = tmp_path / "run"
    run(["--dataset", str(pics), "--model", "cnn", "--epochs", "1", "--batch-size", "16", "--image-size", "12",
         "--output-dir", str(out)], timeout=240)
    pre = json.loads((out / "final" / "preprocessing.json").read_text())
    assert pre["kind"] == "encoded_images" and pre["size"] == [12, 12] and len(pre["mean"]) == 3
    new = write_folder(tmp_path / "new", 17, classes=3)
    target = tmp_path / "p.parquet"
    predict([str(out / "final"), str(new), "--output", str(target)])
    got = pd.read_parquet(target)
    assert got["index"].tolist() == list(range(17))
    assert set(got["label"]) == {"class0", "class1", "class2"} and set(got["prediction"]) <= set(pre["class_names"])
    assert np.allclose(np.stack(got["probabilities"]).sum(axis=1), 1.0)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A tiny BERT (tests/hf_fixtures.py) trained one epoch on sentences, truncated to 8 tokens."""
    pytest.importorskip("transformers")
    from tests import hf_fixtures

    root = tmp_path_factory.mktemp("text")
    data = root / "data"
    data.mkdir()
    hf_fixtures.write_text_csv(data / "train.csv", n=120, seed=0)
    hf_fixtures.write_text_csv(data / "validation.csv", n=23, seed=1)
    args = ["--dataset", str(data), "--model", f"hf:{hf_fixtures.tiny_bert(root / 'bert')}", "--batch-size", "8",
            "--lr", "1e-2", "--max-length", "8"]
    out = root / "run"
    run([*args, "--epochs", "1", "--output-dir", str(out)], timeout=240)
    return data, out, args


def test_text_runs_predict_csv_and_txt_like_the_runs_own_eval(text_run, tmp_path):
    data, out, args = text_run
    pre = json.loads((out / "final" / "preprocessing.json").read_text())
    assert pre["kind"] == "text" and pre["text_columns"] == ["text"] and pre["max_length"] == 8
    last = out / "checkpoints" / list_checkpoints(out)[-1]
    evaluated = tmp_path / "eval.parquet"
    run([*args, "--eval-only", "--resume", str(last), "--output-dir", str(tmp_path / "eval"),
         "--predictions", str(evaluated)], timeout=240)
    expected = pd.read_parquet(evaluated)
    assert list(expected.columns) == ["index", "label", "prediction", "probabilities", "label_id", "prediction_id"]

    one = tmp_path / "one.parquet"
    predict([str(out), str(data / "validation.csv"), "--output", str(one), "--batch-size", "5"])
    got = pd.read_parquet(one)
    assert list(got.columns) == list(expected.columns) and got["index"].tolist() == list(range(23))
    for column in ("label", "prediction", "label_id", "prediction_id"):
        assert got[column].tolist() == expected[column].tolist(), column
    np.testing.assert_allclose(np.stack(got["probabilities"]), np.stack(expected["probabilities"]), atol=1e-5)
    checkpoint = tmp_path / "checkpoint.parquet"  # a checkpoint folder: its weights, its run's final/hf
    predict([str(last), str(data / "validation.csv"), "--output", str(checkpoint), "--batch-size", "5"])
    pd.testing.assert_frame_equal(pd.read_parquet(checkpoint), got)

    lines = tmp_path / "new.txt"
    lines.write_text("\n".join(pd.read_csv(data / "validation.csv")["text"]) + "\n")
    txt = tmp_path / "txt.parquet"
    predict([str(out / "final"), str(lines), "--output", str(txt), "--batch-size", "7"], nproc=2)
    from_txt = pd.read_parquet(txt)
    assert list(from_txt.columns) == ["index", "prediction", "probabilities", "prediction_id"]
    assert from_txt["index"].tolist() == list(range(23))  # each line once, in order, on 2 processes
    assert from_txt["prediction"].tolist() == expected["prediction"].tolist()
    np.testing.assert_allclose(np.stack(from_txt["probabilities"]), np.stack(expected["probabilities"]), atol=1e-5)

    pd.read_csv(data / "validation.csv").rename(columns={"text": "sentence"}).to_csv(tmp_path / "x.csv", index=False)
    done = predict([str(out), str(tmp_path / "x.csv"), "--output", str(tmp_path / "bad.parquet")], check=False)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "lacks text column(s) text" in lines[0], done.stderr
    assert not (tmp_path / "bad.parquet").exists()


def test_multi_label_rows_name_their_classes():
    from launcher.loop.predicting import _named, named_rows

    rows = {"index": [0, 1], "label": [[0, 2], []], "prediction": [[2], [0, 1]], "probabilities": [[0.1] * 3] * 2}
    named = named_rows(rows, ["a", "b", "c"], "multi_label_classification")
    assert named["label"] == [[0, 2], []] and named["prediction"] == [[2], [0, 1]]  # the ids stay
    assert named["label_names"] == [["a", "c"], []] and named["prediction_names"] == [["c"], ["a", "b"]]
    pre = {"problem_type": "multi_label_classification", "class_names": ["a", "b", "c"]}
    assert _named(rows, pre)["prediction_names"] == [["c"], ["a", "b"]]
