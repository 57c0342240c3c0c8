"""recipes/lm.py (draft, issue 20): the default run up to training, an hf: GPT-2 with its own tokenizer, and
bad input: one line each, exit 2 (checked in-process: `main` is what the script runs)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.helpers import ROOT, make_env
from tests.hf_fixtures import tiny_gpt2

RECIPE = ROOT / "recipes" / "lm.py"


def recipe_main(args: list[str], capsys) -> tuple[int, list[str]]:
    """Exit code and stderr lines of the recipe's main() in this process."""
    module = sys.modules.get("lm_recipe")
    if module is None:
        spec = importlib.util.spec_from_file_location("lm_recipe", RECIPE)
        module = sys.modules["lm_recipe"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
        spec.loader.exec_module(module)
    capsys.readouterr()
    code = module.main(args)
    return code, capsys.readouterr().err.strip().splitlines()


def lm(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RECIPE), *args], env=make_env(), cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("texts")
    texts = [f"def function_{i}(x):\n    return x * {i} + {i * i}\n" * 8 for i in range(30)]
    for i, text in enumerate(texts):
        (folder / f"f{i}.py").write_text(text)
    return folder, texts


@pytest.mark.slow
def test_default_run_prints_the_corpus_line_and_a_sample():
    done = lm("--block-size", "64", "--sample-tokens", "8")
    assert done.returncode == 0, done.stderr
    assert "Python files of the standard library" in done.stdout and "train tokens" in done.stdout
    assert "MFU: none on a CPU" in done.stdout
    assert "sample: 'def ' -> " in done.stdout


@pytest.mark.slow
def test_hf_gpt2_with_its_own_tokenizer(corpus, tmp_path):
    folder, texts = corpus
    model = tiny_gpt2(tmp_path / "gpt2", texts, n_positions=64)
    done = lm("--model", f"hf:{model}", "--dataset", str(folder), "--block-size", "32", "--sample-tokens", "5")
    assert done.returncode == 0, done.stderr
    assert f"corpus: {folder}, 28 train and 2 validation documents" in done.stdout
    assert "sample: 'def ' -> " in done.stdout


def test_bad_input_is_one_line(corpus, tmp_path, capsys):
    folder, texts = corpus
    model = tiny_gpt2(tmp_path / "gpt2", texts, n_positions=64)
    assert recipe_main(["--model", f"hf:{model}", "--dataset", str(folder), "--block-size", "65"], capsys) == (2, [
        f"lm.py: error: --block-size 65 is beyond the 64 positions of model hf:{model}; use --block-size 64 or less"])
    bare = tiny_gpt2(tmp_path / "bare", texts, tokenizer=False)
    code, err = recipe_main(["--model", f"hf:{bare}", "--dataset", str(folder)], capsys)
    assert code == 2 and len(err) == 1 and "has no tokenizer" in err[0]
    (tmp_path / "numbers.csv").write_text("x,y\n1,2\n3,4\n")
    assert recipe_main(["--dataset", str(tmp_path / "numbers.csv")], capsys) == (2, [
        "lm.py: error: no text column found (looked for a string column named text/content/document/body, or "
        "the only string column): name it with --text-column; the dataset's columns: x, y"])
    code, err = recipe_main(["--dataset", str(folder), "--block-size", "100000"], capsys)
    assert code == 2 and len(err) == 1 and "fewer than the 1 process(es)" in err[0]
    assert recipe_main(["--model", "gpt-huge"], capsys)[0] == 2
    assert recipe_main(["--model-config", "x"], capsys)[1] == [
        "lm.py: error: --model-config builds an hf: model from a config; use it with --model hf:NAME"]
