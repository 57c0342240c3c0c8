"""transformers models through the recipe: `--model hf:FOLDER` on text and images, end to end.

The models and the text dataset are built here (tests/hf_fixtures.py), offline; runs are shared across
assertions (module-scoped), so each kind costs two training launches, three evaluations and one
killed-and-resumed run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch

from launcher.checkpoint import list_checkpoints, load_model_weights
from tests import hf_fixtures
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

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-assets")
    (root / "empty").mkdir()
    return {
        "csv": hf_fixtures.write_text_csv(root / "sentences.csv"),
        "bert": hf_fixtures.tiny_bert(root / "bert"),
        "bert_no_tokenizer": hf_fixtures.tiny_bert(root / "bert-no-tokenizer", tokenizer=False),
        "vit": hf_fixtures.tiny_vit(root / "vit"),
        "empty": root / "empty",
    }


def kind_args(assets, kind: str) -> list[str]:
    """300 sentences (240 to train), batch 8: 30 steps an epoch on 1 process; digits, batch 16: 90."""
    if kind == "text":
        return ["--dataset", str(assets["csv"]), "--model", f"hf:{assets['bert']}", "--batch-size", "8",
                "--lr", "1e-2", "--save-every-steps", "4", "--epochs", "2"]
    return ["--model", f"hf:{assets['vit']}", "--batch-size", "16", "--lr", "5e-3", "--save-every-steps", "10",
            "--epochs", "3"]


@pytest.fixture(scope="module", params=["text", "image"])
def trained(request, assets, tmp_path_factory):
    """The same run on 1 and on 2 processes."""
    kind = request.param
    runs = {"kind": kind, "args": kind_args(assets, kind)}
    for nproc in (1, 2):
        out = tmp_path_factory.mktemp(f"{kind}{nproc}")
        runs[f"log{nproc}"] = run([*runs["args"], "--output-dir", str(out)], nproc=nproc).stdout
        runs[nproc] = out
    return runs


def test_trains_on_one_and_two_processes(trained):
    for nproc in (1, 2):
        rows = read_metrics(trained[nproc])
        assert {r["world_size"] for r in rows} == {nproc}
        assert rows[-1]["val_accuracy"] > (0.6 if trained["kind"] == "text" else 0.5), rows[-1]  # chance: 1/3, 1/10
        assert rows[-1]["val_samples"] == (60 if trained["kind"] == "text" else 359)
        assert (trained[nproc] / "final" / "hf" / "config.json").is_file()
    if trained["kind"] == "text":  # the checkpoint's 2-class head cannot take 3 classes: a notice, no traceback
        assert "new head for 3 classes" in trained["log1"]
        assert "classifier.weight" in trained["log1"] and "Traceback" not in trained["log1"]


def test_eval_only_is_identical_on_1_2_3_processes(trained, tmp_path):
    best = trained[1] / "checkpoints" / "best"
    results = []
    for nproc in (1, 2, 3):
        out = tmp_path / f"eval{nproc}"
        run([*trained["args"], "--eval-only", "--resume", str(best), "--eval-batch-size", "7",
             "--output-dir", str(out)], nproc=nproc)
        results.append(json.loads((out / "eval.json").read_text()))
    row = next(r for r in read_metrics(trained[1]) if r["step"] == int(best.resolve().name.split("-")[1]))
    for got in results:
        assert got["val_confusion_matrix"] == row["val_confusion_matrix"]
        assert got["val_samples"] == row["val_samples"]
        assert abs(got["val_loss"] - row["val_loss"]) < 1e-6


def test_sigkill_then_resume_auto_is_bit_identical(trained, tmp_path):
    proc = start([*trained["args"], "--output-dir", str(tmp_path)], nproc=2)
    reached = wait_for(lambda: bool(list_checkpoints(tmp_path)), timeout=180, proc=proc)
    signal_tree(proc.pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=60)
    assert reached and proc.returncode != 0, output[-3000:]
    result = run([*trained["args"], "--output-dir", str(tmp_path), "--resume", "auto"], nproc=2)
    assert "resumed from" in result.stdout
    assert_same_weights(final_weights(tmp_path), final_weights(trained[2]))
    assert comparable(read_metrics(tmp_path)) == comparable(read_metrics(trained[2]))


def test_final_hf_loads_with_from_pretrained_and_predicts_the_same(trained, assets):
    """final/hf/ is a save_pretrained folder: model, label names, tokenizer or image processor."""
    from transformers import AutoConfig

    from launcher.models import hf
    from launcher.data import load_splits
    from launcher.loop import default_unpack, forward
    from launcher.data.text import TextOptions

    exported = trained[2] / "final" / "hf"
    text = trained["kind"] == "text"
    if text:
        from transformers import AutoModelForSequenceClassification as Auto, AutoTokenizer

        options = TextOptions(lambda: AutoTokenizer.from_pretrained(exported))  # the exported tokenizer
        data = load_splits(str(assets["csv"]), text=options)
        names = ["negative", "neutral", "positive"]
    else:
        from transformers import AutoImageProcessor, AutoModelForImageClassification as Auto

        assert AutoImageProcessor.from_pretrained(exported).size["height"] == 12
        data = hf.with_image_processor(load_splits("digits"), str(exported))
        names = [str(i) for i in range(10)]
    assert list(AutoConfig.from_pretrained(exported).id2label.values()) == names
    shared = Auto.from_pretrained(exported).eval()
    trained_model = hf.load_model(str(assets["bert" if text else "vit"]), data, notice=lambda line: None).eval()
    load_model_weights(trained_model, trained[2] / "final")
    inputs, labels = default_unpack(data.val.__getitems__(list(range(len(data.val)))))
    with torch.no_grad():
        got, expected = forward(shared, inputs), forward(trained_model, inputs)
    assert torch.equal(got, expected)
    assert (got.argmax(-1) == labels).double().mean() > 0.5


def with_unused_parameter(input_shape, num_classes):
    """An MLP with an auxiliary head the loss never reaches."""

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU())
            self.head = torch.nn.Linear(32, num_classes)
            self.aux_head = torch.nn.Linear(32, 2)

        def forward(self, x):
            return {"logits": self.head(self.body(x))}  # a mapping, as some models return

    return Model()


def test_model_with_unused_parameter_trains_on_two_processes(tmp_path):
    result = run(["--model", "tests.test_hf:with_unused_parameter", "--epochs", "1", "--output-dir",
                  str(tmp_path)], nproc=2)
    line = next(x for x in result.stdout.splitlines() if x.startswith("unused parameters"))
    assert "aux_head.weight" in line and "find_unused_parameters=True" in line
    assert read_metrics(tmp_path)[0]["world_size"] == 2


BAD = {
    "hf folder without a model": (lambda a: ["--dataset", str(a["csv"]), "--model", f"hf:{a['empty']}"],
                                  "no transformers model there"),
    "text with --model mlp": (lambda a: ["--dataset", str(a["csv"]), "--model", "mlp"], "--model hf:NAME_OR_PATH"),
    "model without tokenizer": (lambda a: ["--dataset", str(a["csv"]), "--model", f"hf:{a['bert_no_tokenizer']}"],
                                "has no tokenizer"),
    "transformers missing": (lambda a: ["--model", f"hf:{a['vit']}"], 'pip install -e ".[hf]"'),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(assets, tmp_path, case):
    args, needle = BAD[case]
    out = tmp_path / "existing"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    env = make_env()
    if case == "transformers missing":  # a transformers package that fails to import, first on the path
        fake = tmp_path / "no-transformers" / "transformers"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text("raise ImportError('transformers is not installed')\n")
        env["PYTHONPATH"] = f"{fake.parent}:{env['PYTHONPATH']}"
    proc = subprocess.run([sys.executable, str(RECIPE), *args(assets), "--output-dir", str(out)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert needle in lines[0] and lines[0].startswith("classify.py: error:")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoint_loads_in_float32(tmp_path, dtype):
    """transformers 5 would keep a bf16/fp16 checkpoint's dtype: AdamW would then step half-precision weights
    and fp16 mixed precision would refuse to unscale fp16 gradients."""
    from types import SimpleNamespace

    from launcher.models.hf import load_model, load_tokenizer

    folder = hf_fixtures.tiny_bert(tmp_path / "bert", dtype=dtype)
    saved = json.loads((folder / "config.json").read_text())
    assert saved.get("dtype", saved.get("torch_dtype")) == dtype  # the checkpoint really is half precision
    data = SimpleNamespace(kind="text", name="sentences", class_names=["negative", "neutral", "positive"],
                           preprocessor=load_tokenizer(str(folder)))
    model = load_model(str(folder), data, notice=lambda _: None)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("problem", ["regression", "multi_label_classification"])
def test_other_problem_types_round_trip_through_final_hf(assets, tmp_path, problem):
    """An hf: text model on a float score or on lists of tags: transformers' problem_type (and, for a
    regression, the target's units) in final/hf/config.json, so from_pretrained predicts what the run reported."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from launcher.data import load_splits
    from launcher.data.text import TextOptions
    from launcher.loop import default_unpack, forward

    score = {"negative": -1.0, "neutral": 0.0, "positive": 1.0}
    tags = {"negative": [0], "neutral": [1], "positive": [0, 1]}  # two tags, one or both
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": text, "target": 50 + 10 * score[label] + i % 3
                                        if problem == "regression" else tags[label]}) + "\n"
                            for i, (text, label) in enumerate(hf_fixtures.sentences(200))))
    out = tmp_path / "run"
    log = run(["--dataset", str(path), "--label-column", "target", "--model", f"hf:{assets['bert']}",
               "--batch-size", "8", "--lr", "1e-2", "--epochs", "2", "--output-dir", str(out)], nproc=1).stdout
    assert f"problem type: {problem}" in log  # detected: float values, lists of ids
    exported = out / "final" / "hf"
    config = AutoConfig.from_pretrained(exported)
    assert config.problem_type == problem
    data = load_splits(str(path), label_column="target", problem_type=problem,
                       text=TextOptions(lambda: AutoTokenizer.from_pretrained(exported)))
    inputs, labels = default_unpack(data.val.__getitems__(list(range(len(data.val)))))
    with torch.no_grad():
        outputs = forward(AutoModelForSequenceClassification.from_pretrained(exported).eval(), inputs)
    [row] = read_metrics(out)[-1:]
    if problem == "regression":
        assert config.num_labels == 1 and config.target_std[0] > 1  # the units of the label column
        mean, std = torch.tensor(config.target_mean), torch.tensor(config.target_std)
        predicted, actual = outputs.double() * std + mean, labels.double().view(-1, 1) * std + mean
        assert (predicted - actual).abs().mean().item() == pytest.approx(row["val_mae"], rel=1e-4)
        assert "val_accuracy" not in row
    else:
        assert config.num_labels == 2
        exact = ((outputs > 0) == labels.bool()).all(-1).double().mean().item()
        assert exact == pytest.approx(row["val_exact_match"], rel=1e-9)
