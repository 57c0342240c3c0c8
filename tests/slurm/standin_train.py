"""A small stand-in for a launcher recipe, for the SLURM tests: same flags, same preemption contract.

    accelerate launch tests/slurm/standin_train.py --output-dir DIR [--steps N] [--seed S] [--lr LR]

It trains a tiny linear model on synthetic data, deterministically for a given seed and world size, and
writes into --output-dir what the tests look at: `progress.json` (rank 0, after every step),
`events.jsonl` (started/resumed/preempted/finished, with world size), `metrics.jsonl` and
`final/model.safetensors`. Preemption follows the recipes' contract: SIGUSR1/SIGTERM only set a flag; at
each step boundary the ranks max-reduce the flag, save one checkpoint together (rank 0 writes, all wait)
and exit with 75. `--resume auto` continues from that checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from safetensors.torch import save_file

EXIT_PREEMPTED = 75


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--resume", default="auto", choices=("auto", "never"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--step-seconds", type=float, default=0.0, help="sleep per step (slow it down)")
    parser.add_argument("--wandb-group", default=None)
    args = parser.parse_args()

    received: list[int] = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: received.append(signum))

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.pt"

    torch.manual_seed(args.seed)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    start = 0
    if args.resume == "auto" and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
    model, optimizer = accelerator.prepare(model, optimizer)

    def event(kind: str, **extra: object) -> None:
        if accelerator.is_main_process:
            row = {"event": kind, "step": step, "world_size": world, "time": time.time(),
                   "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")), **extra}
            with open(out / "events.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    step = start
    loss = torch.zeros(())
    event("resumed" if start else "started", group=args.wandb_group, seed=args.seed, lr=args.lr)
    generator = torch.Generator().manual_seed(1234 + args.seed)
    true_w = torch.randn(8, 1, generator=generator)
    while step < args.steps:
        flag = torch.tensor([1 if received else 0])
        if world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            if accelerator.is_main_process:
                state = {"model": accelerator.unwrap_model(model).state_dict(),
                         "optimizer": optimizer.state_dict(), "step": step}
                torch.save(state, str(checkpoint) + ".tmp")
                os.replace(str(checkpoint) + ".tmp", checkpoint)
            accelerator.wait_for_everyone()
            event("preempted", signal=received[0] if received else None)
            accelerator.end_training()
            return EXIT_PREEMPTED
        # The same global batch every time for a given step; each rank trains on its own slice of it.
        batch_gen = torch.Generator().manual_seed(args.seed * 100003 + step)
        x = torch.randn(16, 8, generator=batch_gen)
        y = x @ true_w
        x, y = x[rank::world], y[rank::world]
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        accelerator.backward(loss)
        optimizer.step()
        step += 1
        if accelerator.is_main_process:
            tmp = out / "progress.json.tmp"
            tmp.write_text(json.dumps({"step": step, "loss": loss.item()}))
            os.replace(tmp, out / "progress.json")
        if args.step_seconds:
            time.sleep(args.step_seconds)

    if accelerator.is_main_process:
        (out / "final").mkdir(exist_ok=True)
        weights = {k: v.contiguous() for k, v in accelerator.unwrap_model(model).state_dict().items()}
        save_file(weights, out / "final" / "model.safetensors")
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "world_size": world, "train_loss": loss.item()}) + "\n")
    event("finished")
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
