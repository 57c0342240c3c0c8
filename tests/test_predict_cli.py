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
