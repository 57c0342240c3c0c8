"""A tiny `fit` over make_loader for tests/test_elastic.py, run with `accelerate launch`.

    elastic_job.py OUT_FILE --samples N --batch-size B [--grad-accum A] [--epochs E]

A linear model without randomness (no dropout) on N fixed random samples, plain SGD: the result depends
only on which samples form each optimizer step, so any world size can be compared with one process whose
batch is the global batch. Rank 0 writes the final weights to OUT_FILE (safetensors).
"""

from __future__ import annotations

import argparse

import torch

from launcher import fit, make_accelerator
from launcher.checkpoint import save_weights
from launcher.data import TensorBatchedDataset, make_loader


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--samples", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    accelerator = make_accelerator(grad_accum=args.grad_accum, seed=0)
    data = torch.Generator().manual_seed(1)
    x = torch.randn(args.samples, 5, generator=data, dtype=torch.float64)
    y = torch.randint(0, 3, (args.samples,), generator=data)
    train = make_loader(TensorBatchedDataset(x, y), args.batch_size, shuffle=True, seed=3)
    val = make_loader(TensorBatchedDataset(x, y), args.batch_size, shuffle=False, seed=3)
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    history = fit(model, optimizer, train, val, torch.nn.CrossEntropyLoss(), epochs=args.epochs, num_classes=3,
                  accelerator=accelerator, progress=False)
    if accelerator.is_main_process:
        save_weights(accelerator.get_state_dict(model), args.out)
        print("train_samples", [row["train_samples"] for row in history], "val_samples",
              [row["val_samples"] for row in history])
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
