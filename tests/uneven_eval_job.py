"""`evaluate` and `predict` of a sharded (FSDP2) or replicated (DDP) model on validation sets of every size
modulo the global batch (tests/test_uneven_evaluation.py launches it on 1, 2 and 3 processes).

python tests/uneven_eval_job.py OUT: rank 0 writes OUT/results.json with, for every validation size, the
regression metrics of `evaluate` (the task's loss), of a custom step that returns one summed loss, and the
rows of `predict`. A rank with one batch fewer than its peers would leave them in FSDP2's parameter
all-gather forever; the short bounds below turn such a hang into exit 76 within seconds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from launcher import Regression, StepOutput, Timeouts, evaluate, make_accelerator
from launcher.data import TensorBatchedDataset, make_loader
from launcher.loop import predict
from launcher.parallel.fsdp import launcher_shards, shard_model

BATCH = 4


def model() -> nn.Module:
    torch.manual_seed(0)  # several FSDP units (cpu_fsdp.yaml wraps submodules of > 10,000 parameters)
    return nn.Sequential(nn.Linear(16, 160), nn.Tanh(), nn.Linear(160, 96), nn.Tanh(), nn.Linear(96, 1))


def summed_step(module: nn.Module, batch) -> StepOutput:
    x, y = batch
    out = module(x)
    return StepOutput(((out - y) ** 2).sum(), count=y.shape[0], outputs=out, targets=y)


def main(out: Path) -> None:
    accelerator = make_accelerator(collective_timeout=5, init_timeout=20)
    accelerator.launcher_timeouts = Timeouts(collective=5, init=20)
    net = model()
    if launcher_shards(accelerator):
        net = shard_model(accelerator, net, torch.optim.SGD(net.parameters(), lr=0.1))
    else:
        net = accelerator.prepare_model(net)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 16, generator=g), 3 + 2 * torch.randn(64, 1, generator=g)
    task = Regression(target_mean=3.0, target_std=2.0)
    # Every remainder modulo the global batch of 2 and of 3 processes (8, 12), and sets smaller than the world.
    sizes = [1, 2, 3, 5, *range(12, 25)]
    results = {}
    for n in sizes:
        loader = make_loader(TensorBatchedDataset(x[:n], y[:n]), BATCH, shuffle=False)
        metrics = evaluate(net, loader, task=task, accelerator=accelerator).as_row("val")
        summed = evaluate(net, loader, step=summed_step, accelerator=accelerator).as_row("val")
        rows = predict(net, loader, task, accelerator=accelerator)
        results[n] = {"metrics": metrics, "summed": summed, "rows": rows}
    if accelerator.is_main_process:
        (out / "results.json").write_text(json.dumps({"world_size": accelerator.num_processes, "results": results}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
