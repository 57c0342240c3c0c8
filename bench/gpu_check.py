"""GPU check: launcher's fit with bf16 reads nothing back to the host per training step, and its samples/s
against the leanest loop's. Needs a CUDA GPU (it exits with a message otherwise).

    python bench/gpu_check.py                         # CNN workload, 3 epochs per run
    python bench/gpu_check.py --workload mlp --cnn-samples 4000 --out bench/gpu_results.json

How "no host sync per step" is shown: torch.cuda.set_sync_debug_mode("warn") makes every synchronizing CUDA
call (a device-to-host copy, .item(), a stream or device synchronize, a pageable host-to-device copy that
waits for the stream) emit a warning. fit runs twice on the same data, with two different numbers of steps
per epoch (batch sizes B and B/2), and every warning is recorded with the line of launcher code that caused
it. If the number of syncs per epoch is the same for both, none happens per step: what remains are the
epoch-level reads (metrics, validation) listed in the output. A sync per step would add one per batch.

Then the leanest loop (tensors already on the GPU, bf16 autocast, metrics summed on the device and read once
per epoch) and fit over the recipe's data path run interleaved, and their median samples/s are compared.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def record_syncs(fn):
    """Run fn() with sync debug warnings on; returns (result, list of the launcher/bench frames that synced)."""
    import torch

    sites: list[str] = []
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return original(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if "/launcher/" in f.filename or "/bench/" in f.filename]
        sites.append(f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].line}" if frames else "?")

    torch.cuda.synchronize()
    with warnings.catch_warnings():  # restores warnings.showwarning afterwards
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return result, sites


def run_fit(w, batch_size: int, epochs: int, seed: int):
    import torch

    from bench.loops import reset_accelerate_state
    from launcher import fit, make_accelerator
    from launcher.data import make_loader

    reset_accelerate_state()
    accelerator = make_accelerator(seed=seed, mixed_precision="bf16")
    model = w.model(seed)
    optimizer = w.optimizer(model)
    loaders = (make_loader(w.splits.train, batch_size, shuffle=True),
               make_loader(w.splits.val, batch_size, shuffle=False))
    return fit(model, optimizer, *loaders, torch.nn.CrossEntropyLoss(), epochs=epochs, num_classes=w.num_classes,
               accelerator=accelerator, seed=seed, progress=False, log_every=10**9)


def lean_bf16(w, epochs: int, seed: int) -> list[float]:
    """The leanest loop on the GPU in bf16; samples/s of each epoch's training part."""
    import torch
    import torch.nn.functional as F

    device = torch.device("cuda")
    model = w.model(seed).to(device)
    optimizer = w.optimizer(model)
    x, y, xv, yv = (t.to(device) for t in w.tensors())
    n, bs = len(y), w.batch_size
    generator = torch.Generator().manual_seed(seed)
    rates = []
    for _ in range(epochs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.float64, device=device)
        order = torch.randperm(n, generator=generator).to(device)
        model.train()
        for i in range(0, n, bs):
            idx = order[i:i + bs]
            xb, yb = x[idx], y[idx]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(xb)
                loss = F.cross_entropy(out, yb)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum.add_(loss.detach(), alpha=len(idx))
            correct.add_((out.argmax(1) == yb).sum())
        torch.stack([loss_sum, correct]).tolist()
        rates.append(n / (time.perf_counter() - start))
        model.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            for i in range(0, len(yv), bs):
                model(xv[i:i + bs]).argmax(1)
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="cnn", choices=("mlp", "cnn"))
    p.add_argument("--cnn-samples", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "gpu_results.json"))
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check.py: no CUDA GPU here; run it on a machine with one", file=sys.stderr)
        return 2
    from bench.workloads import build_workloads

    w = build_workloads([args.workload], cnn_samples=args.cnn_samples, seed=args.seed)[args.workload]
    syncs = {}
    for batch_size in (w.batch_size, w.batch_size // 2):
        history, sites = record_syncs(functools.partial(run_fit, w, batch_size, args.epochs, args.seed))
        steps = history[-1]["step"] // args.epochs
        syncs[batch_size] = {"steps_per_epoch": steps, "syncs": len(sites),
                             "syncs_per_epoch": len(sites) / args.epochs, "sites": sorted(set(sites))}
        print(f"batch {batch_size}: {steps} steps/epoch, {len(sites)} synchronizing calls in {args.epochs} epochs")
    counts = [s["syncs"] for s in syncs.values()]
    per_step = counts[0] != counts[1]
    print("synchronizing calls come from:\n  " + "\n  ".join(sorted({s for v in syncs.values() for s in v["sites"]})))
    print("FAIL: the number of syncs grows with the number of steps" if per_step else
          "OK: the same number of syncs whatever the number of steps: none per training step")

    rates = {"lean": [], "launcher": []}
    for _ in range(args.repeats):
        rates["lean"] += lean_bf16(w, args.epochs + 1, args.seed)[1:]
        history = run_fit(w, w.batch_size, args.epochs + 1, args.seed)
        rates["launcher"] += [row["samples_per_second"] for row in history[1:]]
    lean, launcher = statistics.median(rates["lean"]), statistics.median(rates["launcher"])
    print(f"training samples/s (median, bf16, {torch.cuda.get_device_name(0)}): leanest loop {lean:,.0f}, "
          f"launcher fit {launcher:,.0f} ({launcher / lean:.3f}x)")
    Path(args.out).write_text(json.dumps({
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "workload": w.description,
        "syncs": syncs, "sync_per_step": per_step, "samples_per_s": {"lean": lean, "launcher": launcher},
        "all_rates": rates}, indent=1))
    return 1 if per_step else 0


if __name__ == "__main__":
    sys.exit(main())
