"""One process of the scaling benchmark (run by `accelerate launch` from bench/extras.py).

Trains a workload (default: the CNN) with `fit` over the recipe's data path, then counts what evaluations send into
collectives: launcher.evaluate (one all-reduce of the confusion matrix and loss sum) against the
`gather_for_metrics` loop of accelerate's examples, each on the validation split and on that split
repeated four times. Rank 0 writes the results as JSON to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from bench.loops import Run, _EpochClockTracker, _quiet  # noqa: E402
from bench.workloads import build_workloads  # noqa: E402
from launcher import evaluate, fit, make_accelerator  # noqa: E402
from launcher.data import TensorBatchedDataset, batched_collate, make_loader  # noqa: E402
from launcher.faults.preemption import PreemptionWatch  # noqa: E402

COUNTED = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "all_gather_object",
           "gather_object", "broadcast_object_list", "reduce", "gather")


@contextlib.contextmanager
def count_collectives():
    """Count calls and tensor bytes passed to torch.distributed's collectives (this process's side)."""
    counts = {"calls": 0, "bytes": 0}
    originals = {name: getattr(dist, name) for name in COUNTED}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            counts["calls"] += 1
            for a in list(args) + list(kwargs.values()):
                if isinstance(a, torch.Tensor):
                    counts["bytes"] += a.numel() * a.element_size()
                    break  # the tensor this rank contributes (an output list comes first in all_gather)
                if isinstance(a, list) and a and isinstance(a[0], torch.Tensor) and name != "all_gather":
                    counts["bytes"] += sum(t.numel() * t.element_size() for t in a)
                    break
            return fn(*args, **kwargs)
        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def gather_for_metrics_eval(accelerator, model, loader) -> float:
    """The validation loop of accelerate's examples/cv_example.py."""
    model.eval()
    accurate, num_elems = 0, 0
    for inputs, targets in loader:
        with torch.no_grad():
            outputs = model(inputs)
        predictions, references = accelerator.gather_for_metrics((outputs.argmax(dim=-1), targets))
        accurate_preds = predictions == references
        num_elems += accurate_preds.shape[0]
        accurate += accurate_preds.long().sum()
    return accurate.item() / num_elems


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--workload", default="cnn", choices=("mlp", "cnn"))
    p.add_argument("--no-preemption-vote", action="store_true",
                   help="stub PreemptionWatch.should_stop out (a reference for what the vote costs)")
    p.add_argument("--no-watchdog", action="store_true",
                   help="start no launcher.faults.watchdog in fit (a reference for what the hang watchdog costs)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--cnn-samples", type=int, default=640)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.no_preemption_vote:
        PreemptionWatch.should_stop = lambda self: False
    if args.no_watchdog:
        import launcher.loop.training
        from launcher.faults.watchdog import NO_WATCHDOG

        launcher.loop.training.start_watchdog = lambda progress, timeouts: NO_WATCHDOG
    accelerator = make_accelerator(seed=args.seed)
    w = build_workloads([args.workload], cnn_samples=args.cnn_samples, seed=args.seed)[args.workload]
    model, run = w.model(args.seed), Run()
    train_loader, val_loader = w.recipe_loaders()
    with _quiet(), count_collectives() as during_fit:
        history = fit(model, w.optimizer(model), train_loader, val_loader, torch.nn.CrossEntropyLoss(),
                      epochs=args.epochs, num_classes=w.num_classes, accelerator=accelerator, seed=args.seed,
                      tracker=_EpochClockTracker(run))
    # fit's own all-reduces: one per validation and one per training epoch (the metrics); the rest are
    # the preemption vote's, one per optimizer step.
    steps = history[-1]["step"]
    xv, yv = w.tensors()[2:]
    collectives = {"fit": {"what": "the preemption vote (4 bytes per step) and one metrics all-reduce per "
                                   "training epoch and per validation", "steps": steps, **during_fit}}
    for repeat in (1, 4):
        val = TensorBatchedDataset(xv.repeat(repeat, *([1] * (xv.dim() - 1))), yv.repeat(repeat))
        loader = make_loader(val, w.batch_size, shuffle=False)  # sharded per rank by its sampler already
        with count_collectives() as counts:
            evaluate(model, loader, torch.nn.CrossEntropyLoss(), num_classes=w.num_classes, accelerator=accelerator)
        collectives[f"eval_launcher_{repeat}"] = {"what": "launcher evaluate", "val_samples": len(val), **counts}
        # gather_for_metrics needs Accelerate's own sharding (it drops the padding of the last batch).
        loader = accelerator.prepare_data_loader(DataLoader(val, batch_size=w.batch_size, collate_fn=batched_collate))
        with count_collectives() as counts:
            gather_for_metrics_eval(accelerator, model, loader)
        collectives[f"eval_gather_{repeat}"] = {"what": "accelerate gather_for_metrics loop", "val_samples": len(val),
                                                **counts}
    rates = [row["samples_per_second"] for row in history[1:]]
    if accelerator.is_main_process:
        Path(args.out).write_text(json.dumps({
            "processes": accelerator.num_processes, "threads": args.threads,
            "samples_per_s": statistics.median(rates), "epoch_s": statistics.median(run.epoch_seconds()[1:]),
            "val_accuracy": history[-1]["val_accuracy"], "collectives": collectives}, indent=1))
    accelerator.wait_for_everyone()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
