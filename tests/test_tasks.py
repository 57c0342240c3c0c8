"""Every task, exact at any world size: launcher/tasks/ against scikit-learn, and tests/tasks_job.py on 1, 2
and 3 processes (evaluate with torchmetrics metrics, fit with a regression, a multi-label task, a custom step
and a model's own loss, one token-level step under gradient accumulation)."""

import json
import math

import pytest
import torch
from sklearn import metrics as skm

from launcher import Monitor, MultiLabelClassification, Regression, UsageError, evaluate, fit
from launcher.tasks.base import BatchLoss, sum_state_dicts
from launcher.tasks.language_modeling import CausalLM
from tests import tasks_job
from tests.helpers import ROOT, make_env, run

JOB = ROOT / "tests" / "tasks_job.py"


# --- the statistics against scikit-learn (no processes) ---

def test_regression_stats_match_sklearn_in_original_units_and_ignore_padding():
    task = Regression(2, target_mean=[10.0, -3.0], target_std=[4.0, 0.5])
    g = torch.Generator().manual_seed(0)
    outputs, targets = torch.randn(50, 2, generator=g), torch.randn(50, 2, generator=g)
    stats = task.stats(torch.device("cpu"))
    for start in range(0, 50, 16):  # batches of 16, the last one 2 real samples and 14 repeats
        out, tgt = outputs[start:start + 16], targets[start:start + 16]
        valid = None if len(out) == 16 else len(out)
        if valid:
            out, tgt = torch.cat([out, outputs[:16 - valid]]), torch.cat([tgt, targets[:16 - valid]])
        stats.add_batch(BatchLoss(task.loss(out, tgt), None, out, tgt), valid)
    m = stats.reduce()
    pred = (outputs.double() * torch.tensor([4.0, 0.5]) + torch.tensor([10.0, -3.0])).numpy()
    true = (targets.double() * torch.tensor([4.0, 0.5]) + torch.tensor([10.0, -3.0])).numpy()
    assert m.samples == 50
    assert m.loss == pytest.approx(skm.mean_squared_error(true, pred), rel=1e-12)
    assert m.mae == pytest.approx(skm.mean_absolute_error(true, pred), rel=1e-12)
    assert m.rmse == pytest.approx(math.sqrt(skm.mean_squared_error(true, pred)), rel=1e-12)
    assert m.r2 == pytest.approx(skm.r2_score(true, pred), rel=1e-9)


def test_multi_label_stats_match_sklearn_and_sum_across_ranks():
    g = torch.Generator().manual_seed(1)
    logits, targets = torch.randn(40, 6, generator=g), (torch.rand(40, 6, generator=g) > 0.6).float()
    task = MultiLabelClassification(6)
    parts = []
    for rank in range(3):  # three ranks' shares, summed as a resume at another world size does
        stats = task.stats(torch.device("cpu"))
        out, tgt = logits[rank::3], targets[rank::3]
        stats.add_batch(BatchLoss(task.loss(out, tgt), None, out, tgt))
        parts.append(stats.state_dict())
    stats = task.stats(torch.device("cpu"))
    stats.load_state_dict(sum_state_dicts(parts))
    m = stats.reduce()
    pred, true = (logits > 0).numpy(), targets.bool().numpy()
    assert m.f1_micro == pytest.approx(skm.f1_score(true, pred, average="micro", zero_division=0), rel=1e-12)
    assert m.f1_macro == pytest.approx(skm.f1_score(true, pred, average="macro", zero_division=0), rel=1e-12)
    assert m.exact_match == pytest.approx(skm.accuracy_score(true, pred), rel=1e-12)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits.double(), targets.double())
    assert m.loss == pytest.approx(float(expected), rel=1e-6)


def test_causal_lm_loss_is_the_mean_over_valid_tokens():
    ids, labels = tasks_job.lm_data(9)
    logits = torch.randn(9, tasks_job.LENGTH, tasks_job.VOCAB, generator=torch.Generator().manual_seed(2))
    task = CausalLM()
    sums, counts = task.loss(logits, labels)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, tasks_job.VOCAB),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
    assert float(sums.sum() / counts.sum()) == pytest.approx(float(expected), rel=1e-6)
    assert counts.tolist() == (labels[:, 1:] != -100).sum(dim=1).tolist()


@pytest.mark.parametrize("kwargs, message", [
    (dict(task=Regression(1), monitor=Monitor("val_accuracy")),
     "Monitor metric 'val_accuracy' is not a metric; choose one of val_loss, val_mae, val_rmse, val_r2$"),
    (dict(task=Regression(1), monitor=Monitor("val_top2"), metrics={"top2": object()}),
     "metric 'top2' .* needs update"),
    (dict(task=Regression(1), monitor=Monitor("val_mse_tm")),
     "choose one of val_loss, val_mae, val_rmse, val_r2$"),
])
def test_bad_task_options_fail_before_training(kwargs, message):
    model = torch.nn.Linear(8, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 8), torch.randn(8, 1)))
    with pytest.raises((UsageError, ValueError), match=message):
        fit(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, loader, epochs=1, progress=False, **kwargs)


def test_a_user_metric_needs_a_mode_and_loss_fn_shapes_are_reduced_per_sample():
    import torchmetrics

    model = torch.nn.Linear(8, 1)
    data = torch.utils.data.TensorDataset(torch.randn(12, 8), torch.randn(12, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=5)
    with pytest.raises(UsageError, match=r"Monitor\('val_mse_tm', 'max'\) or 'min'"):
        fit(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, loader, torch.nn.MSELoss(), epochs=1,
            metrics={"mse_tm": torchmetrics.MeanSquaredError()}, monitor=Monitor("val_mse_tm"), progress=False)
    # (N, 1) outputs and targets with MSELoss: one loss per sample, val_loss the plain MSE
    m = evaluate(model, loader, torch.nn.MSELoss(), prepare=True)
    with torch.no_grad():
        assert m.loss == pytest.approx(float(torch.nn.functional.mse_loss(model(data.tensors[0]), data.tensors[1])),
                                       rel=1e-6)
    assert m.samples == 12


# --- 1, 2 and 3 processes ---

@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    results = {}
    for nproc in (1, 2, 3):
        out = tmp_path_factory.mktemp(f"tasks{nproc}")
        run([str(out)], nproc, script=JOB, env=make_env(), timeout=400)
        results[nproc] = json.loads((out / "results.json").read_text()) | {"out": str(out)}
    return results


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, float):  # float32 forward passes of other batch compositions differ in the last bit
            assert value == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
        else:
            assert value == b[key], key  # counts and confusion matrices: exactly


@pytest.mark.slow
def test_eval_metrics_and_torchmetrics_are_the_same_on_1_2_and_3_processes(launches):
    """Through Accelerate's padded loader: the same to float32 tolerance. Through make_loader (every evaluation
    batch of one shape, launcher.data.sampling): every sample's prediction, probability and per-sequence loss
    bit for bit, and the metrics to the order of a float64 sum."""
    one = launches[1]["eval"]
    rows = {f"{task}/rows" for task in ("regression", "multi_label", "single_label", "causal_lm")}
    assert set(one) == {"regression/plain", "regression/elastic", "multi_label/plain", "multi_label/elastic",
                        "single_label/plain", "single_label/elastic", "causal_lm/elastic"} | rows
    for nproc in (2, 3):
        for key in one:
            if key in rows:
                assert launches[nproc]["eval"][key] == one[key], (nproc, key)  # bitwise
                assert one[key]["index"] == list(range(tasks_job.VAL))
            elif key.endswith("/elastic"):
                for name, value in one[key].items():
                    got = launches[nproc]["eval"][key][name]
                    assert got == (pytest.approx(value, rel=1e-12, abs=1e-12) if isinstance(value, float) else value)
            else:
                _same(launches[nproc]["eval"][key], one[key])
    for key, row in one.items():
        if key not in rows:
            assert row["val_samples"] == tasks_job.VAL, key  # 101 samples, none counted twice
    # the torchmetrics metrics agree with the task's own sums, and both with scikit-learn
    reg = one["regression/plain"]
    assert reg["val_mse_tm"] == pytest.approx(reg["val_loss"], rel=1e-12)
    assert reg["val_r2_tm"] == pytest.approx(reg["val_r2"], rel=1e-9)
    x, y = tasks_job.val_data("regression")
    with torch.no_grad():
        pred = tasks_job.fixed_model("regression")(x) * 70 + 150
    assert reg["val_loss"] == pytest.approx(skm.mean_squared_error((y * 70 + 150).numpy(), pred.numpy()), rel=1e-6)
    ml = one["multi_label/plain"]
    assert ml["val_f1_tm"] == pytest.approx(ml["val_f1_micro"], rel=1e-12)
    x, y = tasks_job.val_data("single_label")
    with torch.no_grad():
        logits = tasks_job.fixed_model("single_label")(x)
    top2 = skm.top_k_accuracy_score(y.numpy(), logits.numpy(), k=2, labels=range(4))
    assert one["single_label/plain"]["val_top2"] == pytest.approx(top2, rel=1e-12)


@pytest.mark.slow
def test_fit_with_every_kind_of_loss_in_2_processes(launches):
    fits = launches[2]["fit"]
    reg = fits["regression"]
    assert [r["epoch"] for r in reg] == [1, 2, 3] and reg[-1]["val_loss"] < reg[0]["val_loss"]
    assert {"val_mae", "val_rmse", "val_r2", "val_mse_tm", "train_mae"} <= set(reg[-1])
    assert not any("accuracy" in k for k in reg[-1])  # never an accuracy for a regression
    assert all(r["train_samples"] == 200 and r["val_samples"] == 40 for r in reg)
    # Monitor on a torchmetrics metric picks the best checkpoint
    best_epoch = min(reg, key=lambda r: r["val_mse_tm"])["epoch"]
    from pathlib import Path

    best = Path(launches[2]["out"]) / "regression" / "checkpoints" / "best"
    assert json.loads((best / "trainer_state.json").read_text())["best_epoch"] == best_epoch
    ml = fits["multi_label"]
    assert ml[-1]["val_f1_micro"] > ml[0]["val_f1_micro"] and {"val_f1_macro", "val_exact_match"} <= set(ml[-1])
    for name in ("custom_step", "model_loss"):
        rows = fits[name]
        assert rows[-1]["train_loss"] < rows[0]["train_loss"], name
        assert rows[-1]["val_samples"] == 40 and rows[-1]["train_samples"] == 200, name
        assert "val_accuracy" in rows[-1], name


@pytest.mark.slow
def test_token_level_step_with_accumulation_and_2_processes_equals_one_process_on_the_batch(launches):
    one, two = launches[1]["lm_step"], launches[2]["lm_step"]
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(torch.tensor(two[key]), torch.tensor(one[key]), rtol=1e-5, atol=1e-6)
    # the step moved the weights (a lost gradient would also be "equal" if nothing trained)
    tasks_job.set_seed(0)
    fresh = tasks_job.TinyLM().state_dict()
    assert any(not torch.allclose(torch.tensor(one[k]), fresh[k]) for k in one)


# --- tied weights ---

class TiedLM(tasks_job.TinyLM):
    """GPT-2's tie_word_embeddings: the output head is the embedding matrix."""

    def __init__(self):
        super().__init__()
        self.head.weight = self.embed.weight


def _train_tied(out, resume=None):
    from accelerate.state import AcceleratorState, GradientState

    from launcher import CausalLM, Checkpointing
    from launcher.data import TensorBatchedDataset, make_loader

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    ids, labels = tasks_job.lm_data(48, seed=6)
    tasks_job.set_seed(0)
    model = TiedLM()
    fit(model, torch.optim.AdamW(model.parameters(), lr=1e-2), make_loader(TensorBatchedDataset(ids, labels), 8,
                                                                           shuffle=True, seed=1),
        make_loader(TensorBatchedDataset(ids[:16], labels[:16]), 8, shuffle=False), epochs=2, task=CausalLM(),
        checkpointing=Checkpointing(out, save_every_steps=4, keep_last=10, resume_from=resume), progress=False)
    return model


def test_tied_weights_checkpoint_resume_bit_identical_and_export(tmp_path):
    from safetensors.torch import load_file

    from launcher.checkpoint.export import export_main

    clean = _train_tied(tmp_path / "clean")
    resumed = _train_tied(tmp_path / "resumed", resume=tmp_path / "clean" / "checkpoints" / "step-00000004")
    assert resumed.head.weight is resumed.embed.weight  # still tied after loading the checkpoint
    for (name, a), b in zip(clean.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    last = tmp_path / "clean" / "checkpoints" / "step-00000012"
    assert export_main([str(last), str(tmp_path / "w.safetensors")]) == 0
    fresh = TiedLM()
    fresh.load_state_dict(load_file(str(tmp_path / "w.safetensors")), strict=True)
    assert torch.equal(fresh.embed.weight, clean.embed.weight) and fresh.head.weight is fresh.embed.weight


def test_a_write_failure_names_its_cause_and_mentions_space_only_for_a_full_disk(tmp_path):
    import errno

    from launcher.faults.write_failures import write_failed

    denied = str(write_failed(PermissionError(errno.EACCES, "Permission denied"), tmp_path, "checkpoint"))
    assert "permission denied" in denied and "space" not in denied
    full = str(write_failed(OSError(errno.ENOSPC, "No space left on device"), tmp_path, "checkpoint"))
    assert "no space left on device" in full and "free space" in full
    shared = str(write_failed(RuntimeError("Some tensors share memory"), tmp_path, "checkpoint"))
    assert "RuntimeError: Some tensors share memory" in shared and "space" not in shared.replace("share memory", "")
