"""`fit` on a user's own model in one process: schedules, accumulation, clipping, early stopping."""

import math

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from launcher import Checkpointing, EarlyStopping, Monitor, evaluate, fit
from launcher.schedulers import reduce_on_plateau, warmup_cosine
from launcher.tracking.tracker import NullTracker


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def blobs(n=240, features=4, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, features, generator=g) * 0.5 + torch.nn.functional.one_hot(y, features).float() * 2
    return TensorDataset(x, y)


def model_and_opt(lr=0.05, seed=0):
    set_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    return model, torch.optim.SGD(model.parameters(), lr=lr)


class Recorder(NullTracker):
    def __init__(self):
        self.train, self.epochs = [], []

    def log_train(self, step, metrics):
        self.train.append((step, dict(metrics)))

    def log_epoch(self, row):
        self.epochs.append(row)


def test_fit_learns_and_returns_history():
    model, opt = model_and_opt()
    data = blobs()
    history = fit(model, opt, DataLoader(data, batch_size=16, shuffle=True), DataLoader(data, batch_size=50),
                  nn.CrossEntropyLoss(), epochs=3, num_classes=3, progress=False)
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert history[-1]["val_accuracy"] > 0.9
    assert history[-1]["val_samples"] == 240 and history[-1]["step"] == 3 * 15
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_warmup_cosine_lr_per_optimizer_step():
    model, opt = model_and_opt(lr=1.0)
    rec = Recorder()
    data = blobs(n=160)
    fit(model, opt, DataLoader(data, batch_size=16), DataLoader(data, batch_size=80), nn.CrossEntropyLoss(),
        epochs=2, num_classes=3, scheduler=warmup_cosine(warmup_steps=4), log_every=1, tracker=rec, progress=False)
    lrs = [m["lr"] for _, m in rec.train]  # lr after each optimizer step's scheduler.step()
    total = 20
    expected = [min((s + 1) / 4, 1.0) if s < 4 else 0.5 * (1 + math.cos(math.pi * (s - 4) / (total - 4)))
                for s in range(1, total + 1)]
    assert lrs == pytest.approx(expected)
    assert [s for s, _ in rec.train] == list(range(1, total + 1))


def test_gradient_accumulation_matches_the_larger_batch():
    data = blobs(n=128)
    results = []
    for batch, accum in ((32, 1), (16, 2)):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        model, opt = model_and_opt()
        history = fit(model, opt, DataLoader(data, batch_size=batch), DataLoader(data, batch_size=64),
                      nn.CrossEntropyLoss(), epochs=2, num_classes=3, grad_accum=accum, progress=False)
        results.append((model, history[-1]["step"]))
    (a, steps_a), (b, steps_b) = results
    assert steps_a == steps_b == 8
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_gradient_clipping_bounds_each_update():
    model, opt = model_and_opt(lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    data = blobs(n=16)
    fit(model, opt, DataLoader(data, batch_size=16), DataLoader(data, batch_size=16), nn.CrossEntropyLoss(),
        epochs=1, num_classes=3, max_grad_norm=1e-3, progress=False)
    step = torch.sqrt(sum(((p - q) ** 2).sum() for p, q in zip(model.parameters(), before)))
    assert step.item() == pytest.approx(1e-3, rel=1e-3)  # one SGD step of lr 1 with a clipped gradient


def test_early_stopping_on_a_metric_that_never_improves():
    model, opt = model_and_opt(lr=0.0)  # nothing changes, so val_loss never improves after epoch 1
    data = blobs(n=64)
    history = fit(model, opt, DataLoader(data, batch_size=16), DataLoader(data, batch_size=32),
                  nn.CrossEntropyLoss(), epochs=10, num_classes=3, monitor=Monitor("val_loss", "min"),
                  early_stopping=EarlyStopping(patience=2), progress=False)
    assert len(history) == 3  # epoch 1 sets the best, epochs 2 and 3 do not improve


def test_reduce_on_plateau_cuts_lr_after_patience():
    model, opt = model_and_opt(lr=1e-6)  # too small to change val_accuracy: every epoch after the first is bad
    data = blobs(n=64)
    history = fit(model, opt, DataLoader(data, batch_size=16), DataLoader(data, batch_size=32),
                  nn.CrossEntropyLoss(), epochs=4, num_classes=3, monitor=Monitor("val_accuracy", "max"),
                  scheduler=reduce_on_plateau(mode="max", factor=0.5, patience=1), progress=False)
    assert len({row["val_accuracy"] for row in history}) == 1
    # rows record the lr the epoch trained with; the cut follows the 2nd bad epoch (> patience)
    assert [row["lr"] for row in history] == pytest.approx([1e-6, 1e-6, 1e-6, 5e-7])


def test_evaluate_is_independent_of_batch_size():
    model, _ = model_and_opt()
    data = blobs(n=101)
    results = {bs: evaluate(model, DataLoader(data, batch_size=bs), nn.CrossEntropyLoss(), num_classes=3,
                            prepare=True) for bs in (1, 7, 50, 101, 500)}
    first = results[1]
    for m in results.values():
        assert m.confusion_matrix == first.confusion_matrix
        assert m.loss == pytest.approx(first.loss, abs=1e-6)
    with torch.no_grad():
        expected = nn.functional.cross_entropy(model(data.tensors[0]), data.tensors[1]).item()
    assert first.loss == pytest.approx(expected, abs=1e-6)


def test_loss_fn_must_give_per_sample_losses():
    model, opt = model_and_opt()
    data = blobs(n=32)
    with pytest.raises(ValueError, match="one loss per sample"):
        fit(model, opt, DataLoader(data, batch_size=16), DataLoader(data, batch_size=16),
            lambda out, y: nn.functional.cross_entropy(out, y), epochs=1, num_classes=3, progress=False)


def test_a_non_finite_loss_stops_fit_at_the_next_log_interval(tmp_path):
    """The loss turns infinite at step 6; the check at the log interval (every 3 steps) stops the run there,
    before the save of step 8, without a per-step host read."""
    from launcher.checkpoint import list_checkpoints
    from launcher.errors import EXIT_DIVERGED
    from launcher.loop import Diverged

    calls = []

    def exploding(outputs, targets):
        calls.append(1)
        losses = nn.functional.cross_entropy(outputs, targets, reduction="none")
        return losses * math.inf if len(calls) >= 6 else losses

    model, opt = model_and_opt()
    data = blobs()
    with pytest.raises(Diverged) as caught:
        fit(model, opt, DataLoader(data, batch_size=16), DataLoader(data, batch_size=50), exploding, epochs=2,
            num_classes=3, progress=False, log_every=3, checkpointing=Checkpointing(tmp_path, save_every_steps=4))
    assert caught.value.code == EXIT_DIVERGED and caught.value.step == 6
    assert "the training loss is inf at step 6 (epoch 1)" in str(caught.value)
    assert list_checkpoints(tmp_path) == ["step-00000004"] and not (tmp_path / "checkpoints" / "best").exists()


@pytest.mark.parametrize("build, message", [
    (lambda: Monitor("acc"), "Monitor metric 'acc' is not a validation metric: name a val_\\* key"),
    (lambda: Monitor("val_loss", "down"), "Monitor mode must be 'max' or 'min'"),
    (lambda: EarlyStopping(patience=0), "EarlyStopping patience must be a whole number of epochs >= 1"),
    (lambda: Checkpointing("runs/x", save_every_steps=0), "Checkpointing save_every_steps must be >= 1"),
    (lambda: Checkpointing("runs/x", keep_last=0), "Checkpointing keep_last must be >= 1"),
])
def test_fit_options_refuse_bad_values_when_built(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_grad_norm_is_logged_before_clipping():
    model, opt = model_and_opt(lr=0.1)
    rec = Recorder()
    data = blobs(n=64)
    fit(model, opt, DataLoader(data, batch_size=16), DataLoader(data, batch_size=64), nn.CrossEntropyLoss(),
        epochs=1, num_classes=3, max_grad_norm=1e-3, log_every=1, tracker=rec, progress=False)
    norms = [m["grad_norm"] for _, m in rec.train]
    assert len(norms) == 4 and all(n > 1e-2 for n in norms)  # the norm as computed, not the clipped 1e-3


def test_fit_refuses_a_monitor_name_the_run_never_produces_before_training():
    """Monitor accepts any val_* name when built (user metrics are named by the caller); fit checks it."""
    from launcher import UsageError

    model, opt = model_and_opt()
    before = [p.detach().clone() for p in model.parameters()]
    data = blobs(n=32)
    with pytest.raises(UsageError, match="Monitor metric 'val_acc' is not a metric; choose one of val_accuracy, "
                                         "val_loss, val_precision, val_recall, val_f1$"):
        fit(model, opt, DataLoader(data, batch_size=16), DataLoader(data, batch_size=16), nn.CrossEntropyLoss(),
            epochs=1, num_classes=3, monitor=Monitor("val_acc"), progress=False)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # nothing trained
