"""A stand-in training job for the tracker tests: `accelerate launch tests/tracking_job.py ...`.

It drives `start_tracker` exactly as the recipe's loop does (log_train every --log-every steps, log_epoch
once per epoch, then a "checkpoint", finish at the end) with real processes, a real gloo group and real
wandb, but with made-up metrics so that it runs in seconds. The checkpoint is a JSON file holding the run
id, the step and the epoch history, written by rank 0 after each epoch.

--stop-after-epoch K --stop kill: rank 0 SIGKILLs itself right after logging epoch K, before its checkpoint.
--stop-after-epoch K --stop crash: the checkpoint of epoch K fails; finish(history, 1) and exit 1.
--stop-after-epoch K --stop preempt: after the checkpoint of epoch K, finish(history, 75) and exit 75.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from launcher.config import TrainConfig
from launcher.tracking.tracker import start_tracker


def fake_row(epoch: int, step: int, world_size: int) -> dict:
    accuracy = [0.5, 0.8, 0.7, 0.9, 0.85][(epoch - 1) % 5]
    loss = [1.2, 0.5, 0.6, 0.3, 0.4][(epoch - 1) % 5]
    return {"epoch": epoch, "step": step, "train_loss": loss + 0.1, "train_accuracy": accuracy - 0.05,
            "val_loss": loss, "val_accuracy": accuracy, "val_precision": accuracy, "val_recall": accuracy,
            "val_f1": accuracy, "val_confusion_matrix": [[epoch, 1], [2, 10 * epoch]], "lr": 0.001 / epoch,
            "epoch_seconds": 1.5, "samples_per_second": 100.0, "world_size": world_size}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps-per-epoch", type=int, default=10)
    parser.add_argument("--log-every", type=int, default=3)
    parser.add_argument("--wandb-mode", default=None)
    parser.add_argument("--stop-after-epoch", type=int, default=None)
    parser.add_argument("--stop", choices=("kill", "crash", "preempt"), default="kill")
    args = parser.parse_args()

    accelerator = Accelerator(cpu=True)
    output_dir = Path(args.output_dir)
    config = TrainConfig(epochs=args.epochs, log_every=args.log_every, output_dir=str(output_dir), lr=0.003,
                         wandb_mode=args.wandb_mode, wandb_group="tests", wandb_tags=["tracker", "cpu"])
    checkpoint = output_dir / "checkpoint.json"
    state = json.loads(checkpoint.read_text()) if checkpoint.exists() else {"step": 0, "history": []}
    run_info = {"world_size": accelerator.num_processes, "num_nodes": 1,
                "procs_per_node": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
                "distributed_type": str(accelerator.distributed_type), "dataset_name": "fake",
                "model_name": "none", "num_classes": 2, "class_names": ["zero", "one"]}
    tracker = start_tracker(config, accelerator=accelerator, output_dir=output_dir, run_info=run_info,
                            resume_run_id=state.get("wandb_run_id"), history=state["history"])
    print(f"rank {accelerator.process_index} run_id {tracker.run_id}", flush=True)

    step, history = state["step"], list(state["history"])
    for epoch in range(len(history) + 1, args.epochs + 1):
        for _ in range(args.steps_per_epoch):
            step += 1
            if step % args.log_every == 0:
                tracker.log_train(step, {"loss": 1.0 / step, "lr": 0.001, "samples_per_second": 100.0,
                                         "epoch": epoch - 1 + 0.5})
        row = fake_row(epoch, step, accelerator.num_processes)
        tracker.log_epoch(row)
        if epoch == args.stop_after_epoch:
            if args.stop == "kill" and accelerator.is_main_process:
                os.kill(os.getpid(), signal.SIGKILL)
            if args.stop == "crash":
                tracker.finish(history, exit_code=1)
                return 1
        history.append(row)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            tmp = checkpoint.with_suffix(".tmp")
            tmp.write_text(json.dumps({"wandb_run_id": tracker.run_id, "step": step, "history": history}))
            tmp.replace(checkpoint)
        accelerator.wait_for_everyone()
        if epoch == args.stop_after_epoch and args.stop == "preempt":
            tracker.finish(history, exit_code=75)
            return 75
    tracker.finish(history, exit_code=0)
    return 0


if __name__ == "__main__":
    try:
        code = main()
    finally:
        # Leaving with the gloo group alive can abort the process at exit ("terminate called ..."), as
        # the recipe knows too.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    sys.exit(code)
