"""Suspicious class labels (launcher/data/labels.py, docs/data.md): a label column mixing numbers and strings is
refused in one line naming the odd values and their rows; a class with a single example gets a one-line
warning. Through the real recipe on CSV files written here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from launcher.data.labels import mixed_labels, singleton_classes
from launcher.errors import UsageError
from tests.helpers import RECIPE, ROOT, make_env, run

ROWS = 61  # odd, so no split divides it evenly


def _csv(path: Path, labels: list) -> Path:
    rng = np.random.default_rng(0)
    lines = ["x1,x2,label"] + [f"{rng.normal():.4f},{rng.normal():.4f},{label}" for label in labels]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_mixed_names_the_fewer_kind_with_rows():
    labels = np.array([str(i % 3) for i in range(20)], dtype=object)
    labels[[4, 11, 12, 13, 19]] = ["cat", "dog", "x", "y", "z"]
    with pytest.raises(UsageError) as err:
        mixed_labels({"train": labels}, "label")
    assert str(err.value) == ("label column 'label' mixes numbers and strings: 5 non-numeric value(s) among 15 "
                              "numbers: 'cat' (row 4), 'dog' (row 11), 'x' (row 12) and 2 more; fix or drop those "
                              "rows, or pick another column with --label-column")
    words = np.array(["cat", "dog", "cat", "2.5", "bird"], dtype=object)
    with pytest.raises(UsageError, match=r"1 number\(s\) among 6 names: '2.5' \(row 3 of split 'validation'\)"):
        mixed_labels({"train": np.array(["cat", "dog"]), "validation": words}, "label")


def test_all_numbers_or_all_names_pass():
    mixed_labels({"train": np.array(["1", "2", " 3", "-4", "1e3", "0.5"])}, "label")
    mixed_labels({"train": np.array(["cat", "dog", "1st", "nan"])}, "label")


def test_singleton_names_the_class_and_its_split():
    names = ["a", "b", "c", "d"]
    line = singleton_classes(names, np.array([0, 0, 1, 2, 2]), np.array([0, 2, 3]))
    assert line == ("warning: 2 class(es) with a single example, which cannot be in both the training and the "
                    "validation split: 'b' (in training only), 'd' (in validation only); add examples or drop "
                    "those rows")
    assert singleton_classes(names, np.array([0, 0, 1, 1]), np.array([2, 2, 3, 3])) is None


@pytest.mark.slow
def test_a_cat_among_integer_labels_exits_2_in_one_line_and_writes_nothing(tmp_path):
    data = _csv(tmp_path / "cat.csv", ["cat" if i == 37 else i % 2 for i in range(ROWS)])
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(RECIPE), "--dataset", str(data), "--output-dir", str(out)],
                          env=make_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0] == ("classify.py: error: label column 'label' mixes numbers and strings: 1 non-numeric value(s) "
                        "among 60 numbers: 'cat' (row 37); fix or drop those rows, or pick another column with "
                        "--label-column")
    assert not out.exists()


@pytest.mark.slow
def test_a_class_with_one_example_is_warned_about_and_trains(tmp_path):
    data = _csv(tmp_path / "single.csv", [2 if i == 30 else i % 2 for i in range(ROWS)])
    result = run(["--dataset", str(data), "--epochs", "1", "--output-dir", str(tmp_path / "run")])
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: 1 class(es) with a single example, which cannot be in both the training and the "
                        "validation split: '2' (in training only); add examples or drop those rows"], result.stdout
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
