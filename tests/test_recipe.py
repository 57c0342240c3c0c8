"""recipes/classify.py end to end, through real `accelerate launch` processes."""

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import CONFIGS, RECIPE, ROOT, free_port, read_metrics, run, make_env

pytestmark = pytest.mark.slow

ROW_KEYS = {"epoch", "step", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_precision",
            "val_recall", "val_f1", "lr", "epoch_seconds", "samples_per_second", "world_size"}


def test_default_run_learns_digits(tmp_path):
    """The README's first command: no arguments but where to write."""
    result = run(["--output-dir", str(tmp_path)])
    rows = read_metrics(tmp_path)
    assert [r["epoch"] for r in rows] == list(range(1, 11))
    assert ROW_KEYS <= rows[-1].keys() and rows[-1]["world_size"] == 1
    assert rows[-1]["val_accuracy"] > 0.9, rows[-1]
    assert rows[-1]["val_samples"] == 359  # 20% of the 1797 digits, each counted once
    assert (tmp_path / "final" / "model.safetensors").is_file()
    assert (tmp_path / "checkpoints" / "best" / "manifest.json").is_file()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["config"]["dataset"] == "digits" and saved["run_info"]["world_size"] == 1
    assert "epoch 10:" in result.stdout
    assert_best_and_rotation(tmp_path, rows, "val_accuracy", max, keep_last=3)


def assert_best_and_rotation(out, rows, metric, pick, keep_last):
    """checkpoints/best is the epoch with the best metric (the first, on ties); K newest plus best remain."""
    from launcher.checkpoint import checkpoint_name, list_checkpoints

    best_row = pick(rows, key=lambda r: (r[metric], -r["epoch"]) if pick is max else (r[metric], r["epoch"]))
    assert (out / "checkpoints" / "best").resolve().name == checkpoint_name(best_row["step"])
    newest = [checkpoint_name(r["step"]) for r in rows[-keep_last:]]
    assert list_checkpoints(out) == sorted(set(newest) | {checkpoint_name(best_row["step"])})


def test_two_processes_over_gloo(tmp_path):
    run(["--output-dir", str(tmp_path), "--epochs", "2", "--model", "cnn", "--best-metric", "val_loss",
         "--best-mode", "min", "--keep-last", "1"], nproc=2)
    rows = read_metrics(tmp_path)
    assert_best_and_rotation(tmp_path, rows, "val_loss", min, keep_last=1)
    assert [r["world_size"] for r in rows] == [2, 2]
    assert rows[-1]["val_samples"] == 359 and rows[-1]["val_accuracy"] > 0.5
    # 1438 training samples, 64 per process per step, 2 processes: 12 steps an epoch
    assert rows[-1]["step"] == 2 * 12


def test_yaml_config_with_cli_override(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("epochs: 1\nbatch_size: 32\nlr: 0.01\nscheduler: constant\n")
    run(["--config", str(cfg), "--batch-size", "16", "--output-dir", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["config"]
    assert (saved["epochs"], saved["batch_size"], saved["lr"], saved["scheduler"]) == (1, 16, 0.01, "constant")
    assert read_metrics(tmp_path / "out")[0]["step"] == 90  # ceil(1438 / 16)


def test_two_nodes_on_loopback(tmp_path):
    """Two `accelerate launch` commands, machine ranks 0 and 1, form one job; both exit 0."""
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "multi_node.yaml"),
               "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
               "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--mixed_precision", "no",
               str(RECIPE), "--epochs", "2", "--output-dir", str(tmp_path)]
        procs.append(subprocess.Popen(cmd, env=make_env(), cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[1][-3000:] + outputs[0][-3000:]
    rows = read_metrics(tmp_path)
    assert [r["world_size"] for r in rows] == [2, 2]
    assert json.loads((tmp_path / "config.json").read_text())["run_info"]["num_nodes"] == 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    run(["--output-dir", str(out), "--epochs", "2", "--val-fraction", "0.23"])
    return out


@pytest.mark.parametrize("nproc,eval_batch", [(1, 8), (1, 1000), (2, 64), (2, 13)])
def test_eval_only_is_exact_for_any_world_and_batch_size(trained, tmp_path, nproc, eval_batch):
    """Same weights -> identical counts and loss whatever the processes and batch size (413 val samples
    do not divide by 8, 2 x 13 or 2 x 64: the last global batch is short and split unevenly)."""
    ckpt = trained / "checkpoints" / "best"
    run(["--eval-only", "--resume", str(ckpt), "--eval-batch-size", str(eval_batch), "--val-fraction", "0.23",
         "--output-dir", str(tmp_path)], nproc=nproc)
    got = json.loads((tmp_path / "eval.json").read_text())
    expected = plain_evaluation(ckpt)
    assert got["world_size"] == nproc and got["val_samples"] == expected["samples"] == 413
    assert got["val_confusion_matrix"] == expected["confusion"]
    assert got["val_accuracy"] == expected["accuracy"]
    assert abs(got["val_loss"] - expected["loss"]) < 1e-6


def plain_evaluation(ckpt):
    """The textbook single-process computation over the whole validation set at once."""
    from launcher.checkpoint import load_model_weights
    from launcher.data import load_splits
    from launcher.models.builtin import build_model

    data = load_splits("digits", val_fraction=0.23, seed=0)
    model = build_model("mlp", data.input_shape, data.num_classes)
    load_model_weights(model, ckpt)
    model.eval()
    x, y = data.val.__getitems__(list(range(len(data.val))))
    with torch.no_grad():
        logits = model(x)
    preds = logits.argmax(-1)
    confusion = torch.zeros(10, 10, dtype=torch.int64)
    confusion.index_put_((y, preds), torch.ones_like(y), accumulate=True)
    return {"samples": len(y), "confusion": confusion.tolist(), "accuracy": (preds == y).double().mean().item(),
            "loss": torch.nn.functional.cross_entropy(logits.double(), y).item()}


BAD_INPUTS = [
    (["--dataset", "/no/such/folder"], "dataset"),
    (["--dataset", "surely-not-a-dataset-name-xyz"], "dataset"),
    (["--label-column", "nope"], "nope"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--model", "transformer9000"], "transformer9000"),
    (["--model", "tests.test_recipe:too_few_outputs"], "10 classes"),
    (["--epochs", "two"], "--epochs"),
    (["--resume", "/no/such/checkpoint"], "--resume"),
]


def too_few_outputs(input_shape, num_classes):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5))


@pytest.mark.parametrize("args,needle", BAD_INPUTS, ids=[a[-1] for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(tmp_path, args, needle):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    proc = subprocess.run([sys.executable, str(RECIPE), *args, "--output-dir", str(out)], env=make_env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert needle in lines[0] and lines[0].startswith("classify.py: error:")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("text,needle", [("bogus_key: 1\n", "unknown key 'bogus_key'"),
                                         ("epochs: [\n", "not valid YAML")])
def test_bad_config_file(tmp_path, text, needle):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    proc = subprocess.run([sys.executable, str(RECIPE), "--config", str(cfg)], env=make_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr


def test_accelerate_configs_are_valid():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"cpu": 1, "cpu_ddp": 2, "single_gpu": 1, "multi_gpu": 8, "multi_node": 16, "fsdp": 8,
                "fsdp_multi_node": 16, "cpu_fsdp": 2}
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == expected.keys()  # a new config gets checked here too
    for name, nproc in expected.items():
        config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))  # rejects unknown keys
        assert config.num_processes == nproc, name
