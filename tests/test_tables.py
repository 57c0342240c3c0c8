"""Tables as people have them (launcher.data.preprocess): string columns one-hot over the training split's
vocabulary with an <other> slot, missing numbers filled with the training mean plus an indicator; both can
be refused instead (--no-categorical, --no-impute), and --streaming refuses them in one line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from launcher.data import load_splits
from launcher.data.preprocess import MAX_CATEGORIES
from launcher.errors import UsageError
from tests.helpers import RECIPE, ROOT, make_env


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "data"
    folder.mkdir()
    n = 101
    train = pd.DataFrame({"x": rng.normal(10, 2, n), "shade": rng.choice(["dark", "light"], n),
                          "city": [f"c{i % 45}" for i in range(n)], "label": rng.integers(0, 2, n)})
    train.loc[[3, 7, 11], "x"] = np.nan
    train.to_csv(folder / "train.csv", index=False)
    val = pd.DataFrame({"x": [np.nan, 1.0, 2.0], "shade": ["dark", "medium", None], "city": ["c1", "c2", "zz"],
                        "label": [0, 1, 0]})
    val.to_csv(folder / "validation.csv", index=False)
    return folder, train


def test_categories_come_from_training_and_missing_numbers_get_its_mean_and_an_indicator(data):
    folder, train = data
    splits = load_splits(str(folder))
    encoder = splits.preprocessing["encoder"]
    assert encoder["categories"]["shade"] == ["dark", "light"]  # "medium" is only in validation
    assert len(encoder["categories"]["city"]) == MAX_CATEGORIES  # capped: the rest go to <other>
    assert encoder["fill"]["x"] == pytest.approx(train["x"].mean()) and encoder["indicators"] == ["x"]
    assert splits.features_line == (f"features: 1 numeric (1 with missing values, filled with training means + "
                                    f"indicators), 2 categorical (shade: 2 categories + <other>, one-hot; city: "
                                    f"{MAX_CATEGORIES} categories + <other>, one-hot) -> {2 + 3 + MAX_CATEGORIES + 1} "
                                    f"inputs")
    names = encoder["features"]
    inputs, _ = splits.val.__getitems__([0, 1, 2])
    raw = inputs.numpy() * np.array(splits.std) + np.array(splits.mean)  # standardized: back to the encoded values
    assert raw[0, names.index("x")] == pytest.approx(train["x"].mean(), rel=1e-5)
    assert raw[:, names.index("x__missing")] == pytest.approx([1, 0, 0], abs=1e-5)
    assert raw[:, names.index("shade=<other>")] == pytest.approx([0, 1, 1], abs=1e-5)  # unseen and missing
    assert raw[:, names.index("city=<other>")] == pytest.approx([0, 0, 1], abs=1e-5)


def test_each_can_be_refused_instead(data):
    folder, _ = data
    with pytest.raises(UsageError, match="--no-categorical: string columns are refused"):
        load_splits(str(folder), categorical=False)
    (folder / "train.csv").write_text(pd.read_csv(folder / "train.csv").drop(columns=["shade", "city"])
                                      .to_csv(index=False))
    (folder / "validation.csv").write_text(pd.read_csv(folder / "validation.csv").drop(columns=["shade", "city"])
                                           .to_csv(index=False))
    with pytest.raises(UsageError, match="feature column.s. x have missing"):
        load_splits(str(folder), impute=False)
    out = folder.parent / "run"
    done = subprocess.run([sys.executable, str(RECIPE), "--dataset", str(folder), "--no-impute", "--output-dir",
                           str(out), "--wandb-mode", "disabled"], env=make_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "missing" in lines[0], done.stderr
    assert not out.exists()


def test_streaming_refuses_string_columns_in_one_line_and_stores_numeric_ones(tmp_path):
    from launcher.data.streaming import load_stream_splits

    for split in ("train", "validation"):
        (tmp_path / split).mkdir()
        pd.DataFrame({"x": [1.0, 2.0, 3.0], "shade": ["a", "b", "a"], "label": [0, 1, 0]}).to_parquet(
            tmp_path / split / "part-00000.parquet")
    with pytest.raises(UsageError, match="one-hot encoded without --streaming only"):
        load_stream_splits(str(tmp_path), seed=0)
    for split in ("train", "validation"):  # numeric columns stream, and the run stores their preprocessing
        pd.DataFrame({"x": [1.0, 2.0, 3.0], "label": [0, 1, 0]}).to_parquet(tmp_path / split / "part-00000.parquet")
    pre = load_stream_splits(str(tmp_path), seed=0).preprocessing
    assert (pre["kind"], pre["columns"], pre["class_names"]) == ("tabular", ["x"], ["0", "1"])
