"""Every task through `fit` and `evaluate` in one launch (tests/test_tasks.py runs it on 1, 2 and 3 processes).

python tests/tasks_job.py OUT: writes OUT/results.json (rank 0) with
- "eval": each task's metrics (torchmetrics metrics included) of a fixed model on a validation split of 101
  samples, through a plain DataLoader (Accelerate pads its last batch) and through make_loader;
- "fit": histories of a regression run (a torchmetrics MSE monitored), a multi-label run, a custom step
  with two loss terms and a model that computes its own loss;
- "lm_step": the weights of a tiny language model after one optimizer step on 8 sequences of different
  lengths, as 1 process x 1 micro-batch of 8, or 2 processes x 2 micro-batches of 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torchmetrics
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from launcher import (
    CausalLM,
    Checkpointing,
    Monitor,
    MultiLabelClassification,
    Regression,
    SingleLabelClassification,
    StepOutput,
    evaluate,
    fit,
    make_accelerator,
)
from launcher.data import TensorBatchedDataset, make_loader
from launcher.loop import predict

VAL = 101  # divides by none of 2, 3 (nor the batch sizes)
VOCAB, LENGTH = 11, 7


def regression_data(n: int = 240, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = 150 + 70 * torch.tanh(x[:, :3].sum(dim=1, keepdim=True)) + 5 * torch.randn(n, 1, generator=g)
    return x, y  # targets in original units; the task standardizes with (150, 70)


def multi_label_data(n: int = 240, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, :5] + 0.3 * torch.randn(n, 5, generator=g) > 0.2).float()


def single_label_data(n: int = 240, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, x[:, :4].argmax(dim=1)


def lm_data(n: int = VAL, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels (the ids, -100 after each sequence's own length: 2..LENGTH tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    lengths = torch.randint(2, LENGTH + 1, (n,), generator=g)
    labels = torch.where(torch.arange(LENGTH) < lengths[:, None], ids, torch.full_like(ids, -100))
    return ids, labels


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids).cumsum(dim=1) / torch.arange(1, ids.shape[1] + 1)[:, None]  # causal mean
        return self.head(torch.tanh(hidden))


class TwoHeads(nn.Module):
    """Returns (logits, reconstruction): a custom step trains both with two loss terms."""

    def __init__(self):
        super().__init__()
        self.body, self.classes, self.decoder = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.body(x))
        return self.classes(h), self.decoder(h)


class OwnLoss(nn.Module):
    """A model that computes its own loss given labels, as transformers' models do."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 4)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.linear(features)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def two_term_step(model: nn.Module, batch: tuple) -> StepOutput:
    x, y = batch
    logits, reconstruction = model(x)
    per_sample = nn.functional.cross_entropy(logits, y, reduction="none") \
        + 0.5 * (reconstruction - x).pow(2).mean(dim=1)
    return StepOutput(per_sample, outputs=logits, targets=y)


def tasks() -> dict:
    return {"regression": Regression(1, target_mean=150.0, target_std=70.0),
            "multi_label": MultiLabelClassification(5), "single_label": SingleLabelClassification(4)}


def user_metrics(name: str) -> dict:
    if name == "regression":
        return {"mse_tm": torchmetrics.MeanSquaredError(), "r2_tm": torchmetrics.R2Score()}
    if name == "multi_label":
        return {"f1_tm": torchmetrics.classification.MultilabelF1Score(5, average="micro")}
    return {"top2": torchmetrics.classification.MulticlassAccuracy(4, top_k=2, average="micro")}


def fixed_model(name: str) -> nn.Module:
    set_seed(5)
    return {"regression": nn.Linear(8, 1), "multi_label": nn.Linear(8, 5), "single_label": nn.Linear(8, 4)}[name]


def val_data(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = {"regression": regression_data, "multi_label": multi_label_data,
            "single_label": single_label_data}[name](VAL, seed=10)
    if name == "regression":
        y = (y - 150.0) / 70.0  # what the model sees: standardized targets
    return x, y


def evaluations(acc) -> dict:
    out = {}
    for name, task in tasks().items():
        x, y = val_data(name)
        for kind in ("plain", "elastic"):
            loader = (DataLoader(TensorDataset(x, y), batch_size=16) if kind == "plain"
                      else make_loader(TensorBatchedDataset(x, y), 16, shuffle=False))
            model = fixed_model(name)
            metrics = evaluate(model, loader, task=task, metrics=user_metrics(name), accelerator=acc, prepare=True)
            out[f"{name}/{kind}"] = dict(metrics.as_row("val"))
            if kind == "elastic":  # every sample's prediction (and probabilities), for bitwise comparison
                out[f"{name}/rows"] = predict(model, loader, task, accelerator=acc)
    ids, labels = lm_data()
    set_seed(5)
    model, loader = TinyLM(), make_loader(TensorBatchedDataset(ids, labels), 8, shuffle=False)
    metrics = evaluate(model, loader, task=CausalLM(), accelerator=acc, prepare=True)
    out["causal_lm/elastic"] = dict(metrics.as_row("val"))
    out["causal_lm/rows"] = predict(model, loader, CausalLM(), accelerator=acc)  # each sequence's summed loss
    return out


def fits(acc, out_dir: Path) -> dict:
    results = {}
    x, y = regression_data()
    set_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    train = make_loader(TensorBatchedDataset(x[:200], (y[:200] - 150) / 70), 16, shuffle=True, seed=0)
    val = make_loader(TensorBatchedDataset(x[200:], (y[200:] - 150) / 70), 16, shuffle=False)
    results["regression"] = fit(model, torch.optim.AdamW(model.parameters(), lr=3e-3), train, val, epochs=3,
                                task=tasks()["regression"], metrics=user_metrics("regression"), accelerator=acc,
                                monitor=Monitor("val_mse_tm", "min"), progress=False,
                                checkpointing=Checkpointing(out_dir / "regression", keep_last=1))
    x, y = multi_label_data()
    set_seed(0)
    model = nn.Linear(8, 5)
    results["multi_label"] = fit(model, torch.optim.AdamW(model.parameters(), lr=3e-2),
                                 make_loader(TensorBatchedDataset(x[:200], y[:200]), 16, shuffle=True, seed=0),
                                 make_loader(TensorBatchedDataset(x[200:], y[200:]), 16, shuffle=False),
                                 epochs=2, task=MultiLabelClassification(5), accelerator=acc, progress=False)
    x, y = single_label_data()
    set_seed(0)
    model = TwoHeads()
    results["custom_step"] = fit(model, torch.optim.AdamW(model.parameters(), lr=1e-2),
                                 DataLoader(TensorDataset(x[:200], y[:200]), batch_size=16, shuffle=True),
                                 DataLoader(TensorDataset(x[200:], y[200:]), batch_size=16),
                                 epochs=2, step=two_term_step, task=SingleLabelClassification(4), accelerator=acc,
                                 progress=False)
    set_seed(0)
    model = OwnLoss()
    results["model_loss"] = fit(model, torch.optim.AdamW(model.parameters(), lr=1e-2),
                                DataLoader([{"features": a, "labels": b} for a, b in zip(x[:200], y[:200])],
                                           batch_size=16, shuffle=True),
                                DataLoader([{"features": a, "labels": b} for a, b in zip(x[200:], y[200:])],
                                           batch_size=16),
                                "model", epochs=2, num_classes=4, accelerator=acc, progress=False)
    return results


def lm_step(acc) -> dict:
    """One SGD step on 8 sequences: 1 process with all 8, or 2 processes x 2 micro-batches of 2."""
    ids, labels = lm_data(8, seed=4)
    world = acc.num_processes
    acc.gradient_accumulation_steps = 1 if world == 1 else 2
    set_seed(0)
    model = TinyLM()
    loader = make_loader(TensorBatchedDataset(ids, labels), 8 // (world * acc.gradient_accumulation_steps),
                         shuffle=False)
    fit(model, torch.optim.SGD(model.parameters(), lr=1.0), loader, loader, epochs=1, task=CausalLM(),
        accelerator=acc, progress=False, find_unused_parameters="off")
    acc.gradient_accumulation_steps = 1
    return {k: v.tolist() for k, v in acc.unwrap_model(model).state_dict().items()}


def main() -> None:
    out_dir = Path(sys.argv[1])
    acc = make_accelerator(seed=0)
    results = {"world_size": acc.num_processes, "eval": evaluations(acc)}
    if acc.num_processes <= 2:
        results["lm_step"] = lm_step(acc)
    if acc.num_processes == 2:
        results["fit"] = fits(acc, out_dir)
    if acc.is_main_process:
        (out_dir / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
    # Leave as the recipe does: together, with the group torn down, and without the interpreter's teardown,
    # in which gloo's background threads now and then abort a finished rank ("terminate called without an
    # active exception"), which torchrun reports as a failed job.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
