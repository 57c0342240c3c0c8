"""Data that changed under the same --dataset (docs/relaunch.md): the fingerprint (launcher.data.fingerprint)
and the relaunch that refuses it unless --accept-data-change, for a CSV file (recipes/classify.py) and a
folder of text files (recipes/lm.py), through real processes."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.data import fingerprint
from launcher.data.fingerprint import data_change, data_fingerprint
from tests.helpers import RECIPE, ROOT, make_env, read_metrics, run

LM = ROOT / "recipes" / "lm.py"


# ---------------------------------------------------------------------------------------------------------
# The fingerprint


def _folder(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    for name, text in (("a.txt", "alpha\n"), ("sub/b.txt", "beta beta\n"), ("c.csv", "x,label\n1,0\n")):
        (root / name).write_text(text)
    (root / ".hidden").write_text("not data")
    return root


def _bump(path: Path, seconds: int = 10) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def test_the_same_files_listed_again_keep_the_fingerprint(tmp_path):
    data = _folder(tmp_path / "data")
    first = data_fingerprint(str(data))
    assert first == data_fingerprint(str(data))
    assert (first["source"], first["files"], sorted(first["entries"])) == ("folder", 3, ["a.txt", "c.csv", "sub/b.txt"])
    (data / ".hidden").write_text("still not data")  # hidden files are not read by the loaders
    assert data_fingerprint(str(data))["listing"] == first["listing"]
    assert data_change(first, data_fingerprint(str(data))) is None


def test_a_touched_file_changes_the_fingerprint_but_not_the_data_when_its_bytes_are_the_same(tmp_path):
    data = _folder(tmp_path / "data")
    first = data_fingerprint(str(data))
    _bump(data / "a.txt")
    touched = data_fingerprint(str(data))
    assert touched["listing"] != first["listing"] and touched["content"] == first["content"]
    assert data_change(first, touched) is None  # small data: the contents decide


def test_a_touched_file_is_a_change_when_the_data_is_too_large_to_read(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "CONTENT_LIMIT", 0)
    data = _folder(tmp_path / "data")
    first = data_fingerprint(str(data))
    assert first["content"] is None
    _bump(data / "a.txt")
    assert data_change(first, data_fingerprint(str(data))).startswith("sizes/mtimes differ: 1 file with a new "
                                                                      "modification time")


def test_changed_added_and_removed_files_are_counted(tmp_path):
    data = _folder(tmp_path / "data")
    first = data_fingerprint(str(data))
    (data / "a.txt").write_text("alpha and more\n")
    (data / "sub" / "new.txt").write_text("new\n")
    (data / "c.csv").unlink()
    change = data_change(first, data_fingerprint(str(data)))
    assert change.startswith("sizes/mtimes differ: 1 file of another size, 1 file added, 1 file removed; 3 files")


def test_the_same_bytes_rewritten_with_another_order_is_a_change(tmp_path):
    """Shuffled rows keep the size; the contents (small data) tell them apart."""
    path = tmp_path / "rows.csv"
    path.write_text("x,label\n1,0\n2,1\n")
    first = data_fingerprint(str(path))
    path.write_text("x,label\n2,1\n1,0\n")
    _bump(path)
    assert first["source"] == "file"
    assert data_change(first, data_fingerprint(str(path))).startswith("sizes/mtimes differ: 1 file with a new")


def test_embedded_datasets_and_hub_revisions(tmp_path, monkeypatch):
    digits = data_fingerprint("digits")
    assert digits == data_fingerprint("digits") and digits["version"].startswith("scikit-learn ")
    assert digits["files"] >= 1 and data_change(digits, data_fingerprint("digits")) is None
    stdlib = data_fingerprint("stdlib")
    assert stdlib["version"].startswith("Python ") and stdlib["files"] > 100
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert data_fingerprint("owner/name")["revision"] is None  # nothing cached: nothing to compare
    ref = tmp_path / "datasets--owner--name" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("a" * 40)
    old = data_fingerprint("owner/name", "cfg")
    ref.write_text("b" * 40)
    assert data_change(old, data_fingerprint("owner/name", "cfg")) == f"revision {'a' * 12} -> {'b' * 12}"
    assert data_change(None, old) is None  # a run recorded before fingerprints


# ---------------------------------------------------------------------------------------------------------
# Relaunches, for real


@functools.cache
def recipe_main(script: Path):
    """A recipe's main in this process: a refusal is timed and read without the imports."""
    spec = importlib.util.spec_from_file_location(f"recipe_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # lm.py's dataclass looks its module up
    spec.loader.exec_module(module)
    return module.main


def python_recipe(script: Path, args: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(script), *args], env=make_env(), cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()}


def refused(script: Path, args: list[str], out: Path, capsys) -> str:
    """The relaunch exits 2 with one line and writes nothing into the run folder; returns the line."""
    before = snapshot(out)
    capsys.readouterr()
    code = recipe_main(script)([*args, "--output-dir", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert snapshot(out) == before
    return err[0]


def write_rows(path: Path, n: int) -> None:
    rng = random.Random(n)
    rows = [f"{rng.random():.4f},{rng.random():.4f},{i % 2}" for i in range(n)]
    path.write_text("a,b,label\n" + "\n".join(rows) + "\n")


CSV_ARGS = ["--label-column", "label", "--batch-size", "32", "--wandb-mode", "disabled"]


@pytest.mark.slow
def test_a_csv_replaced_under_the_same_path_is_refused_unless_accepted(tmp_path, capsys):
    data, out = tmp_path / "rows.csv", tmp_path / "run"
    write_rows(data, 301)
    run(["--dataset", str(data), "--epochs", "1", "--output-dir", str(out), *CSV_ARGS])  # accelerate launch
    stored = json.loads((out / "config.json").read_text())
    assert stored["data"]["source"] == "file" and stored["data_changes"] == []

    result = python_recipe(RECIPE, ["--epochs", "2", "--output-dir", str(out)])  # unchanged: resumes as before
    assert "resumed from" in result.stdout + result.stderr
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2]

    write_rows(data, 501)  # 300 -> 500 rows: training rows would move into validation
    line = refused(RECIPE, ["--epochs", "3"], out, capsys)
    assert line.startswith(f"classify.py: error: data at {data} changed since the run started (sizes/mtimes "
                           f"differ: 1 file of another size; 1 file, "), line
    assert "--accept-data-change" in line and "new --output-dir" in line

    result = python_recipe(RECIPE, ["--epochs", "3", "--accept-data-change", "--output-dir", str(out)])
    assert "--accept-data-change: training on the new data" in result.stdout + result.stderr
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2, 3]
    stored = json.loads((out / "config.json").read_text())
    assert stored["run_info"]["train_samples"] + stored["run_info"]["val_samples"] == 501
    [change] = stored["data_changes"]
    assert change["dataset"] == str(data) and "1 file of another size" in change["change"]
    assert change["from"]["bytes"] < change["to"]["bytes"] == stored["data"]["bytes"] and change["accepted_at"]
    # The run now records the new data: a relaunch on it is no change (the run is finished: nothing to do).
    result = python_recipe(RECIPE, ["--epochs", "3", "--output-dir", str(out)])
    assert "nothing to do" in result.stdout + result.stderr


def _document(rng: random.Random) -> str:
    words = "the loss is a sum over tokens divided by their count".split()
    return "\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(6)) + "\n"


LM_ARGS = ["--model", "gpt-nano", "--block-size", "32", "--batch-size", "8", "--epochs", "1", "--sample-tokens",
           "0", "--wandb-mode", "disabled"]


@pytest.mark.slow
def test_a_text_corpus_changed_under_the_same_folder_is_refused(tmp_path, capsys):
    corpus, out = tmp_path / "corpus", tmp_path / "run"
    rng = random.Random(0)
    for split, count in (("train", 24), ("validation", 4)):
        (corpus / split).mkdir(parents=True)
        for i in range(count):
            (corpus / split / f"doc{i:02}.txt").write_text(_document(rng))
    python_recipe(LM, ["--dataset", str(corpus), "--output-dir", str(out), *LM_ARGS])
    assert json.loads((out / "config.json").read_text())["data"]["files"] == 28
    (corpus / "train" / "doc00.txt").write_text(_document(rng) * 2)
    (corpus / "validation" / "doc99.txt").write_text(_document(rng))
    line = refused(LM, ["--epochs", "2"], out, capsys)
    assert line.startswith(f"lm.py: error: data at {corpus} changed since the run started (sizes/mtimes differ: "
                           f"1 file of another size, 1 file added; 28 files,"), line
    assert "--accept-data-change" in line
