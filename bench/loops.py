"""The training loops under comparison, each written the way its own documentation writes it.

Every loop trains the workload's model with AdamW for `epochs` epochs, validates after each epoch, and ends
with the same four numbers: training loss and accuracy, validation loss and accuracy. Each returns a
`Run`: a (wall, cpu) clock reading at the start and at the end of every epoch (after validation), so an
epoch's time is the gap between two consecutive readings, measured the same way for every loop, and what
the loop itself would print at the end.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from bench.workloads import Workload


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


@dataclass
class Run:
    marks: list[tuple[float, float]] = field(default_factory=lambda: [clock()])
    final: dict = field(default_factory=dict)

    def mark(self) -> None:
        self.marks.append(clock())

    def epoch_seconds(self, kind: int = 0) -> list[float]:
        """Per-epoch wall (kind 0) or process CPU (kind 1) seconds."""
        return [b[kind] - a[kind] for a, b in zip(self.marks, self.marks[1:])]


def interleaved(loops: dict, run_one, repeats: int, seed: int, final_key: str) -> dict[str, dict[str, list]]:
    """Every loop `repeats` times, in a new random order each repeat, each from a fresh Accelerate state:
    `run_one(loop)` returns its Run. Per loop: the CPU and wall seconds of every epoch but each run's first
    (a warm-up), and `final_key` of each run's last epoch."""
    per = {name: {"cpu": [], "wall": [], final_key: []} for name in loops}
    rng = random.Random(seed)
    for _ in range(repeats):
        order = list(loops)
        rng.shuffle(order)
        for name in order:
            reset_accelerate_state()
            run = run_one(loops[name])
            per[name]["cpu"] += run.epoch_seconds(1)[1:]
            per[name]["wall"] += run.epoch_seconds(0)[1:]
            per[name][final_key].append(run.final[final_key])
    return per


def reset_accelerate_state() -> None:
    """Each loop starts from a fresh Accelerate state, as it would in a process of its own."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# ----------------------------------------------------------------------------------------------- lean


def _zeros(device, n: int = 4) -> list[torch.Tensor]:
    """On-device running sums: training loss, training correct, validation loss, validation correct."""
    return [torch.zeros((), dtype=torch.float64, device=device) for _ in range(n)]


def _lean_validate(model, batches, device, stats) -> None:
    """Validation of the lean loops: on-device sums, no host read."""
    model.eval()
    with torch.no_grad():
        for xb, yb in batches:
            out = model(xb)
            stats[2].add_(F.cross_entropy(out, yb, reduction="sum"))
            stats[3].add_((out.argmax(1) == yb).sum())
    model.train()


def _lean_epoch_end(stats: list[torch.Tensor], n_train: int, n_val: int) -> dict:
    loss, correct, val_loss, val_correct = torch.stack(stats).tolist()  # the one host read of the epoch
    return {"train_loss": loss / n_train, "train_accuracy": correct / n_train,
            "val_loss": val_loss / n_val, "val_accuracy": val_correct / n_val}


def lean_tensors(w: Workload, epochs: int, seed: int, device: torch.device) -> Run:
    """The leanest loop: tensors already on the device, a pre-shuffled index, batches are slices, metrics
    summed on the device and read once per epoch."""
    model = w.model(seed).to(device)
    optimizer = w.optimizer(model)
    x, y, xv, yv = (t.to(device) for t in w.tensors())
    n, bs = len(y), w.batch_size
    generator = torch.Generator().manual_seed(seed)
    val_batches = [(xv[i:i + bs], yv[i:i + bs]) for i in range(0, len(yv), bs)]
    run = Run()
    for _ in range(epochs):
        stats = _zeros(device)
        order = torch.randperm(n, generator=generator).to(device)
        model.train()
        for i in range(0, n, bs):
            idx = order[i:i + bs]
            xb, yb = x[idx], y[idx]
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stats[0].add_(loss.detach(), alpha=len(idx))
            stats[1].add_((out.argmax(1) == yb).sum())
        _lean_validate(model, val_batches, device, stats)
        run.final = _lean_epoch_end(stats, n, len(yv))
        run.mark()
    return run


def lean_loader(w: Workload, epochs: int, seed: int, device: torch.device, loaders=None) -> Run:
    """The same lean loop, fed by the peers' DataLoader: the floor for any loop handed that loader."""
    model = w.model(seed).to(device)
    optimizer = w.optimizer(model)
    train, val = loaders or w.peer_loaders(seed)
    n_train, n_val = len(train.dataset), len(val.dataset)
    run = Run()
    for _ in range(epochs):
        stats = _zeros(device)
        model.train()
        for xb, yb in train:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stats[0].add_(loss.detach(), alpha=len(yb))
            stats[1].add_((out.argmax(1) == yb).sum())
        _lean_validate(model, ((xb.to(device), yb.to(device)) for xb, yb in val), device, stats)
        run.final = _lean_epoch_end(stats, n_train, n_val)
        run.mark()
    return run


def lean_recipe_loader(w: Workload, epochs: int, seed: int, device: torch.device) -> Run:
    """The lean loop over the recipe's loaders (load_splits + make_loader)."""
    torch.manual_seed(seed)
    return lean_loader(w, epochs, seed, device, loaders=w.recipe_loaders())


# ----------------------------------------------------------------------------------------------- seed


def seed_tutorial(w: Workload, epochs: int, seed: int, device: torch.device) -> Run:
    """The seed tutorial's loop: `.item()` on the loss and the correct count every step (a host sync per
    step on a GPU), epoch loss as the mean of the batch means."""
    model = w.model(seed).to(device)
    optimizer = w.optimizer(model)
    criterion = torch.nn.CrossEntropyLoss()
    train_loader, val_loader = w.peer_loaders(seed)
    run = Run()
    for _ in range(epochs):
        model.train()
        running_loss, correct, total = 0.0, 0, 0
        for inputs, labels in train_loader:
            inputs, labels = inputs.to(device), labels.to(device)
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            correct += (outputs.argmax(1) == labels).sum().item()
            total += labels.size(0)
        train_loss, train_acc = running_loss / len(train_loader), correct / total
        model.eval()
        val_loss, val_correct, val_total = 0.0, 0, 0
        with torch.no_grad():
            for inputs, labels in val_loader:
                inputs, labels = inputs.to(device), labels.to(device)
                outputs = model(inputs)
                val_loss += criterion(outputs, labels).item()
                val_correct += (outputs.argmax(1) == labels).sum().item()
                val_total += labels.size(0)
        run.final = {"train_loss": train_loss, "train_accuracy": train_acc,
                     "val_loss": val_loss / len(val_loader), "val_accuracy": val_correct / val_total}
        run.mark()
    return run


# ------------------------------------------------------------------------------------------ accelerate


def plain_accelerate(w: Workload, epochs: int, seed: int, device: torch.device) -> Run:
    """A plain Accelerate loop in the style of accelerate's examples/cv_example.py: prepare, backward,
    step, and `gather_for_metrics` per validation batch; training loss/accuracy summed on the device."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=device.type == "cpu")
    model = w.model(seed)
    optimizer = w.optimizer(model)
    train_dl, eval_dl = w.peer_loaders(seed)
    model, optimizer, train_dl, eval_dl = accelerator.prepare(model, optimizer, train_dl, eval_dl)
    criterion = torch.nn.CrossEntropyLoss()
    run = Run()
    for _ in range(epochs):
        model.train()
        total_loss = torch.zeros((), device=accelerator.device)
        train_correct = torch.zeros((), dtype=torch.long, device=accelerator.device)
        train_elems = 0
        for inputs, targets in train_dl:
            outputs = model(inputs)
            loss = criterion(outputs, targets)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            total_loss += loss.detach() * len(targets)
            train_correct += (outputs.argmax(dim=-1) == targets).long().sum()
            train_elems += len(targets)
        model.eval()
        accurate = torch.zeros((), dtype=torch.long, device=accelerator.device)
        val_loss = torch.zeros((), device=accelerator.device)
        num_elems = 0
        for inputs, targets in eval_dl:
            with torch.no_grad():
                outputs = model(inputs)
            losses = F.cross_entropy(outputs, targets, reduction="none")
            predictions = outputs.argmax(dim=-1)
            predictions, references, losses = accelerator.gather_for_metrics((predictions, targets, losses))
            accurate_preds = predictions == references
            num_elems += accurate_preds.shape[0]
            accurate += accurate_preds.long().sum()
            val_loss += losses.sum()
        train_elems = accelerator.reduce(torch.tensor(train_elems, device=accelerator.device)).item()
        run.final = {"train_loss": accelerator.reduce(total_loss).item() / train_elems,
                     "train_accuracy": accelerator.reduce(train_correct).item() / train_elems,
                     "val_loss": val_loss.item() / num_elems, "val_accuracy": accurate.item() / num_elems}
        run.mark()
    accelerator.free_memory()
    return run


# ------------------------------------------------------------------------------------------- lightning


def lightning_trainer(w: Workload, epochs: int, seed: int, device: torch.device) -> Run:
    """PyTorch Lightning's Trainer with logging, checkpointing, progress bar and model summary off; the
    module sums its metrics on the device and reads them once per epoch, like the lean loop."""
    import logging

    import lightning as L

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # Lightning sets INFO when imported

    class Classifier(L.LightningModule):
        def __init__(self, model: torch.nn.Module):
            super().__init__()
            self.model = model
            self.stats = _zeros("cpu")

        def training_step(self, batch, batch_idx):
            x, y = batch
            out = self.model(x)
            loss = F.cross_entropy(out, y)
            self.stats[0].add_(loss.detach(), alpha=len(y))
            self.stats[1].add_((out.argmax(1) == y).sum())
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            out = self.model(x)
            self.stats[2].add_(F.cross_entropy(out, y, reduction="sum"))
            self.stats[3].add_((out.argmax(1) == y).sum())

        def on_train_epoch_start(self):
            self.stats = _zeros(self.device)

        def configure_optimizers(self):
            return w.optimizer(self.model)

    train, val = w.peer_loaders(seed)
    run = Run()

    class EpochClock(L.Callback):
        def on_train_start(self, trainer, pl_module):
            run.marks = [clock()]

        def on_train_epoch_end(self, trainer, pl_module):  # Lightning runs validation before this hook
            run.final = _lean_epoch_end(pl_module.stats, len(train.dataset), len(val.dataset))
            run.mark()

    module = Classifier(w.model(seed))
    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(max_epochs=epochs, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, callbacks=[EpochClock()])
        trainer.fit(module, train, val)
    return run


# ------------------------------------------------------------------------------------------- launcher


class _EpochClockTracker:
    """A launcher Tracker that only reads the clock when fit reports a finished epoch."""

    run_id = None

    def __init__(self, run: Run):
        self.run = run

    def log_train(self, step, metrics) -> None:
        pass

    def log_epoch(self, row) -> None:
        self.run.final = {k: row[k] for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy")}
        self.run.mark()

    def finish(self, history, exit_code=0) -> None:
        pass


@contextlib.contextmanager
def _quiet():
    """Send what a loop prints (progress bars, epoch summaries) to /dev/null; it is still formatted."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def _launcher_fit(w: Workload, epochs: int, seed: int, device: torch.device, loaders) -> Run:
    from launcher import fit, make_accelerator

    model = w.model(seed)
    optimizer = w.optimizer(model)
    accelerator = make_accelerator(seed=seed, cpu=device.type == "cpu")
    run = Run()
    with _quiet():
        fit(model, optimizer, *loaders, torch.nn.CrossEntropyLoss(), epochs=epochs, num_classes=w.num_classes,
            accelerator=accelerator, seed=seed, tracker=_EpochClockTracker(run))
    accelerator.free_memory()
    return run


def launcher_fit(w: Workload, epochs: int, seed: int, device: torch.device) -> Run:
    """launcher.fit with its defaults (progress bar on, no W&B), handed the peers' DataLoaders."""
    return _launcher_fit(w, epochs, seed, device, w.peer_loaders(seed))


def launcher_recipe(w: Workload, epochs: int, seed: int, device: torch.device) -> Run:
    """launcher.fit over the recipe's data path: load_splits' datasets behind make_loader."""
    return _launcher_fit(w, epochs, seed, device, w.recipe_loaders())


def launcher_recipe_before(w: Workload, epochs: int, seed: int, device: torch.device) -> Run:
    """launcher.fit over the recipe's data path as it was before the elastic sampler: the same datasets
    behind a DataLoader with its per-index BatchSampler, prepared (sharded) by Accelerate."""
    return _launcher_fit(w, epochs, seed, device, w.plain_recipe_loaders(seed))


# name -> (function, what the row means)
VARIANTS = {
    "lean_tensors": (lean_tensors, "leanest loop, pre-made tensors, shuffled index"),
    "lean_loader": (lean_loader, "lean loop over the peers' DataLoader"),
    "seed_tutorial": (seed_tutorial, "seed tutorial: .item() per step, per-batch means"),
    "accelerate": (plain_accelerate, "plain Accelerate loop (gather_for_metrics per batch)"),
    "lightning": (lightning_trainer, "Lightning Trainer, logging/ckpt/progress off"),
    "launcher_fit": (launcher_fit, "launcher fit, defaults, peers' DataLoader"),
    "lean_recipe_loader": (lean_recipe_loader, "lean loop over the recipe's loader"),
    "launcher_recipe": (launcher_recipe, "launcher fit, recipe data path (datasets)"),
    "launcher_recipe_before": (launcher_recipe_before, "launcher fit, recipe datasets, DataLoader + Accelerate "
                               "sharding (the data path before the elastic sampler)"),
}
