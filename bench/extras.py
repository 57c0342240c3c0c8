"""The benchmark's other sections: validation alone, loaders alone, scaling, start-up and checkpoint cost.

Each section is a function `(args, workloads) -> (results as plain data, Markdown table)`.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.loops import _lean_validate, _zeros, clock

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "accelerate_configs"


def _interleaved(cases: dict, repeats: int, seed: int) -> dict:
    """Run each case `repeats` times in a new random order each round; (wall, cpu) seconds per run."""
    rng = random.Random(seed)
    times = {k: {"wall": [], "cpu": []} for k in cases}
    for _ in range(repeats):
        order = list(cases)
        rng.shuffle(order)
        for k in order:
            start = clock()
            cases[k]()
            end = clock()
            times[k]["wall"].append(end[0] - start[0])
            times[k]["cpu"].append(end[1] - start[1])
    return {k: {"wall_s": statistics.median(v["wall"]), "cpu_s": statistics.median(v["cpu"])}
            for k, v in times.items()}


# ------------------------------------------------------------------------------------------ eval


def eval(args, workloads: dict) -> tuple[dict, str]:  # noqa: A001 - the section's name
    """One validation pass: the lean loop's (on-device sums, one read) vs launcher.evaluate (exact confusion
    matrix, per-sample losses, one all-reduce when distributed)."""
    results = {}
    lines = ["### Validation alone (one pass over the validation split)\n",
             "| workload | pass | ms (CPU) | ms (wall) | x lean, same loader (CPU) |", "|---|---|---:|---:|---:|"]
    same = {"launcher evaluate, peers' loader": "lean, peers' loader",
            "launcher evaluate, recipe loader": "lean, recipe loader"}
    for name, w in workloads.items():
        repeats = 2 if args.smoke else {"mlp": 30, "cnn": 8}[name]
        res = _interleaved(_eval_cases(w, args.seed), repeats, args.seed)
        for case, r in res.items():
            ratio = ""
            if case in same:
                r["cpu_x_lean_same_loader"] = r["cpu_s"] / res[same[case]]["cpu_s"]
                ratio = f"{r['cpu_x_lean_same_loader']:.3f}x"
            lines.append(f"| {name} | {case} | {r['cpu_s'] * 1e3:.2f} | {r['wall_s'] * 1e3:.2f} | {ratio} |")
        results[name] = {"repeats": repeats, "passes": res}
    return results, "\n".join(lines)


def _eval_cases(w, seed: int) -> dict:
    from bench.loops import reset_accelerate_state
    from launcher import evaluate, make_accelerator

    reset_accelerate_state()
    acc = make_accelerator(seed=seed)
    model = acc.prepare_model(w.model(seed))
    xv, yv = w.tensors()[2:]
    bs = w.batch_size
    tensor_batches = [(xv[i:i + bs], yv[i:i + bs]) for i in range(0, len(yv), bs)]
    peer_val, recipe_val = w.peer_loaders(seed)[1], w.recipe_loaders()[1]
    loss_fn = torch.nn.CrossEntropyLoss()

    def lean(batches):
        def run():
            stats = _zeros("cpu")
            _lean_validate(model, batches, None, stats)
            torch.stack(stats).tolist()
        return run

    def launcher_eval(loader):
        return lambda: evaluate(model, loader, loss_fn, num_classes=w.num_classes, accelerator=acc)

    return {"lean, tensors": lean(tensor_batches), "lean, peers' loader": lean(peer_val),
            "launcher evaluate, peers' loader": launcher_eval(acc.prepare_data_loader(peer_val)),
            "lean, recipe loader": lean(recipe_val),
            "launcher evaluate, recipe loader": launcher_eval(acc.prepare_data_loader(recipe_val))}


# ------------------------------------------------------------------------------------------ loader

SLICING = "slicing pre-made tensors (leanest loop)"
WORKERS = tuple(f"recipe make_loader, {k} worker{'s' if k > 1 else ''} (wall only)" for k in (1, 2))


def loader(args, workloads: dict) -> tuple[dict, str]:
    """Samples/s of the loaders alone (one training epoch, nothing done with the batches)."""
    results = {}
    lines = ["### Loaders alone (one shuffled training epoch, batches discarded)\n",
             "| workload | loader | samples/s (CPU) | samples/s (wall) | us/batch (CPU) | x slicing (CPU time) |",
             "|---|---|---:|---:|---:|---:|"]
    for name, w in workloads.items():
        n, bs = len(w.splits.train), w.batch_size
        cases = _loader_cases(w, args.seed)
        for case in WORKERS:
            cases[case]()  # start the persistent workers outside the timing
        res = _interleaved(cases, 2 if args.smoke else {"mlp": 15, "cnn": 9}[name], args.seed)
        del cases
        batches = -(-n // bs)
        for case, r in res.items():
            r.update(samples_per_s_cpu=n / r["cpu_s"], samples_per_s_wall=n / r["wall_s"],
                     us_per_batch_cpu=r["cpu_s"] / batches * 1e6, cpu_x_slicing=r["cpu_s"] / res[SLICING]["cpu_s"])
            cpu_cols = ["", "", ""]
            if case not in WORKERS:  # a worker's CPU time is not this process's
                cpu_cols = [f"{r['samples_per_s_cpu']:,.0f}", f"{r['us_per_batch_cpu']:.1f}",
                            f"{r['cpu_x_slicing']:.2f}x"]
            lines.append(f"| {name} | {case} | {cpu_cols[0]} | {r['samples_per_s_wall']:,.0f} | {cpu_cols[1]} | "
                         f"{cpu_cols[2]} |")
        results[name] = {"samples": n, "batch_size": bs, "loaders": res}
    return results, "\n".join(lines)


def _loader_cases(w, seed: int) -> dict:
    from bench.loops import reset_accelerate_state
    from launcher import make_accelerator
    from torch.utils.data import DataLoader

    from launcher.data import batched_collate, make_loader
    from launcher.data.sampling import iterate

    reset_accelerate_state()
    acc = make_accelerator(seed=seed)
    x, y = w.tensors()[:2]
    n, bs = len(y), w.batch_size
    generator = torch.Generator().manual_seed(seed)

    def slicing():
        order = torch.randperm(n, generator=generator)
        for i in range(0, n, bs):
            idx = order[i:i + bs]
            x[idx], y[idx]

    def drain(loader):
        def run():
            for _ in loader:
                pass
        return run

    def drain_direct(loader):
        def run():
            for _ in iterate(loader):
                pass
        return run

    return {
        SLICING: slicing,
        "peers' DataLoader (TensorDataset)": drain(w.peer_loaders(seed)[0]),
        "peers' DataLoader, accelerate-prepared": drain(acc.prepare_data_loader(w.peer_loaders(seed)[0])),
        # What make_loader built before the elastic sampler: the DataLoader's own per-index BatchSampler,
        # sharded by Accelerate's prepare().
        "DataLoader(batch_size, shuffle) over the recipe's dataset": drain(
            DataLoader(w.splits.train, batch_size=bs, shuffle=True, collate_fn=batched_collate)),
        "the same, accelerate-prepared (the recipe before)": drain(acc.prepare_data_loader(
            DataLoader(w.splits.train, batch_size=bs, shuffle=True, collate_fn=batched_collate))),
        "recipe make_loader (ElasticBatchSampler), iterated as a DataLoader": drain(w.recipe_loaders()[0]),
        "recipe make_loader as fit iterates it (0 workers, direct fetch)": drain_direct(w.recipe_loaders()[0]),
        **{case: drain(make_loader(w.splits.train, bs, shuffle=True, num_workers=k))
           for k, case in zip((1, 2), WORKERS)},
    }


# ------------------------------------------------------------------------------------------ scaling


def _launch(script: Path, script_args: list[str], nproc: int, threads: int, timeout: float = 300,
            ) -> subprocess.CompletedProcess:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = CONFIGS / ("cpu.yaml" if nproc == 1 else "cpu_ddp.yaml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--num_processes", str(nproc), "--main_process_port", str(port), str(script), *script_args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "WANDB_MODE": "disabled", "TQDM_DISABLE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def scaling(args, workloads: dict) -> tuple[dict, str]:
    """fit over the recipe's data path in 1 and 2 gloo processes (the CNN workload, and the MLP one where
    per-step costs show), and what each evaluation all-reduces (launcher) or gathers (accelerate's
    gather_for_metrics) at two validation sizes."""
    epochs = 1 if args.smoke else 2
    # (workload, processes, threads per process, extra flags); 1x2 is the fair one-process baseline on 2 cores
    configs = [("cnn", 1, 1, ()), ("cnn", 2, 1, ())]
    if not args.smoke:
        configs[1:1] = [("cnn", 1, 2, ())]
        configs += [("mlp", 1, 1, ()), ("mlp", 2, 1, ()), ("mlp", 2, 1, ("--no-preemption-vote",))]
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workload, nproc, threads, flags in configs:
            key = f"{nproc}x{threads}" + (", vote stubbed out" if flags else "")
            out = Path(tmp) / "scaling.json"
            _launch(ROOT / "bench" / "dist_worker.py",
                    ["--out", str(out), "--workload", workload, "--epochs", str(epochs + 1),
                     "--cnn-samples", str(args.cnn_samples), "--seed", str(args.seed), "--threads", str(threads),
                     *flags], nproc, threads)
            results.setdefault(workload, {})[key] = json.loads(out.read_text())
    lines = ["### Scaling: fit + recipe data path over gloo (batch per process: MLP 32, CNN 64)\n",
             "| workload | processes x threads | train samples/s | speed-up vs 1x1 | epoch s (wall) |",
             "|---|---|---:|---:|---:|"]
    for workload, rows in results.items():
        for key, r in rows.items():
            lines.append(f"| {workload} | {key} | {r['samples_per_s']:.0f} | "
                         f"{r['samples_per_s'] / rows['1x1']['samples_per_s']:.2f}x | {r['epoch_s']:.3f} |")
    two = results["cnn"]["2x1"]["collectives"]
    lines += ["\nCollectives per evaluation with 2 processes (CNN workload; bytes rank 0 sends into them):\n",
              "| evaluation | val samples | calls | bytes |", "|---|---:|---:|---:|"]
    for key, r in two.items():
        if key.startswith("eval"):
            lines.append(f"| {r['what']} | {r['val_samples']} | {r['calls']} | {r['bytes']:,} |")
    steps = two["fit"]
    lines.append(f"\nDuring fit (2 processes, {steps['steps']} optimizer steps), outside DDP's gradient buckets: "
                 f"{steps['calls']} collective calls, {steps['bytes']:,} bytes ({steps['what']}).")
    return results, "\n".join(lines)


# ------------------------------------------------------------------------------------------ startup


def startup(args, workloads: dict) -> tuple[dict, str]:
    """`accelerate launch recipes/classify.py` until the first optimizer step has run (timestamps from
    bench/first_step.py, which runs the recipe unchanged)."""
    procs = (1,) if args.smoke else (1, 2)
    runs = {n: [] for n in procs}
    repeats = 1 if args.smoke else 2
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for nproc in procs:
                out = Path(tmp) / f"start-{nproc}-{r}.json"
                launched = time.time()
                _launch(ROOT / "bench" / "first_step.py",
                        ["--timestamps", str(out), "--output-dir", str(Path(tmp) / f"run-{nproc}-{r}"),
                         "--epochs", "1", "--wandb-mode", "disabled"], nproc, 1)
                marks = json.loads(out.read_text())
                runs[nproc].append({k: v - launched for k, v in marks.items()})
    results = {n: {k: statistics.median(run[k] for run in rs) for k in rs[0]} for n, rs in runs.items()}
    lines = ["### Start-up: `accelerate launch recipes/classify.py` (digits, MLP) to the first training step\n",
             "| processes | script running | imports done | fit called (data, model ready) | first step done |",
             "|---|---:|---:|---:|---:|"]
    for n, r in results.items():
        lines.append(f"| {n} | {r['script_start']:.2f} s | {r['imports_done']:.2f} s | {r['fit_called']:.2f} s | "
                     f"{r['first_step']:.2f} s |")
    return {str(k): v for k, v in results.items()}, "\n".join(lines)


# ------------------------------------------------------------------------------------------ checkpoint


def checkpoint(args, workloads: dict) -> tuple[dict, str]:
    """CheckpointManager.save (safetensors weights, optimizer, RNG, trainer state, fsync, sha256 manifest,
    atomic rename) vs a bare torch.save of the same model and optimizer state."""
    from launcher.models.builtin import MLP, build_model

    shape = (3, 32, 32)
    models = {"cnn": lambda: build_model("cnn", shape, 10), "resnet": lambda: build_model("resnet", shape, 10),
              "mlp, 2048 hidden": lambda: MLP(shape, 10, hidden=2048)}
    results = {}
    lines = ["### Checkpoint save (model + AdamW state, to the local disk)\n",
             "| model | parameters | bare torch.save | torch.save + fsync | launcher CheckpointManager.save | "
             "x bare | x bare + fsync |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, build in models.items():
        torch.manual_seed(args.seed)
        model = build()
        repeats = 2 if args.smoke else (3 if name.startswith("mlp") else 7)
        res = _checkpoint_times(model, shape, repeats, args.seed)
        params = sum(p.numel() for p in model.parameters())
        r = results[name] = {"parameters": params, **res}
        lines.append(f"| {name} | {params:,} | {r['bare'] * 1e3:.1f} ms | {r['bare_fsync'] * 1e3:.1f} ms | "
                     f"{r['launcher'] * 1e3:.1f} ms | {r['launcher'] / r['bare']:.1f}x | "
                     f"{r['launcher'] / r['bare_fsync']:.1f}x |")
    return results, "\n".join(lines)


def _checkpoint_times(model: torch.nn.Module, shape: tuple, repeats: int, seed: int) -> dict:
    from launcher.checkpoint import CheckpointManager, TrainerState

    opt = torch.optim.AdamW(model.parameters())
    torch.nn.functional.cross_entropy(model(torch.randn(4, *shape)), torch.arange(4)).backward()
    opt.step()  # the optimizer state exists, as it does in any real checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        manager = CheckpointManager(Path(tmp) / "run", keep_last=2)
        steps = iter(range(1, 10**6))

        def bare(fsync: bool):
            def run():
                path = Path(tmp) / "bare.pt"
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
                if fsync:
                    fd = os.open(path, os.O_RDONLY)
                    os.fsync(fd)
                    os.close(fd)
            return run

        def managed():
            manager.save(TrainerState(global_step=next(steps)), model_state=model.state_dict(), optimizer=opt)
            manager.rotate(protect=None)

        res = _interleaved({"bare": bare(False), "bare_fsync": bare(True), "launcher": managed}, repeats, seed)
    return {k: v["wall_s"] for k, v in res.items()}


# ------------------------------------------------------------------------------------------ overhead


def overhead(args, workloads: dict) -> tuple[dict, str]:
    """Where fit's per-step time goes beyond the lean loop: a linear model on the MLP workload's data (so the
    model costs little and the loop's own work shows), the lean loop made step by step more like fit."""
    w = workloads.get("mlp")
    if w is None:
        return {}, ""
    steps = 2 * -(-len(w.splits.train) // w.batch_size)  # each run trains two epochs
    cases = {name: _overhead_case(w, level, args.seed) for level, name in enumerate(OVERHEAD_STEPS)}
    res = _interleaved(cases, 2 if args.smoke else 12, args.seed)
    lines = ["### Per-step overhead: a linear model on the MLP data, the lean loop turned into fit step by step\n",
             f"CPU time per training step (two epochs, {steps} steps; every variant also validates one batch per "
             "epoch).\n",
             "| loop | us per step | added by this row |", "|---|---:|---:|"]
    previous = None
    for name, r in res.items():
        r["us_per_step"] = r["cpu_s"] / steps * 1e6
        added = "" if previous is None else f"{r['us_per_step'] - previous:+.1f}"
        lines.append(f"| {name} | {r['us_per_step']:.1f} | {added} |")
        previous = r["us_per_step"]
    return res, "\n".join(lines)


OVERHEAD_STEPS = (
    "lean loop, recipe loader",
    "+ Accelerate's prepared loader (DataLoaderShard)",
    "+ per-sample losses through the loss module, mean-gradient backward",
    "+ ConfusionStats.update instead of two running sums",
    "launcher fit (progress bar, preemption vote, bookkeeping, per-epoch work)",
)


def _overhead_case(w, level: int, seed: int):
    import torch.nn.functional as F

    from bench.loops import _EpochClockTracker, _quiet, Run, reset_accelerate_state
    from launcher import fit, make_accelerator
    from launcher.loop import _mean_backward, per_sample_loss_fn
    from launcher.tasks.classification import ConfusionStats
    from launcher.data import TensorBatchedDataset, make_loader

    x, y = w.tensors()[:2]
    one_batch = TensorBatchedDataset(x[:w.batch_size], y[:w.batch_size])

    def model_and_loaders():
        reset_accelerate_state()
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].numel(), w.num_classes))
        return (model, w.optimizer(model), make_loader(w.splits.train, w.batch_size, shuffle=True),
                make_loader(one_batch, w.batch_size, shuffle=False))

    def run_fit():
        model, opt, train, val = model_and_loaders()
        run = Run()
        with _quiet():
            fit(model, opt, train, val, torch.nn.CrossEntropyLoss(), epochs=2, num_classes=w.num_classes,
                accelerator=make_accelerator(seed=seed), seed=seed, tracker=_EpochClockTracker(run))

    def run_lean():
        model, opt, train, val = model_and_loaders()
        if level >= 1:
            acc = make_accelerator(seed=seed)
            model, opt, train, val = acc.prepare(model, opt, train, val)
            opt = opt.optimizer
        per_sample, backward = per_sample_loss_fn(torch.nn.CrossEntropyLoss()), _mean_backward()
        for _ in range(2):  # the first epoch warms up; the timing covers both, as for fit
            sums, stats = _zeros("cpu", 2), ConfusionStats(w.num_classes, torch.device("cpu"))
            model.train()
            for xb, yb in train:
                out = model(xb)
                if level >= 2:
                    losses = per_sample(out, yb)
                    backward(losses)
                else:
                    loss = F.cross_entropy(out, yb)
                    loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if level >= 3:
                    stats.update(losses.float(), out, yb)
                else:
                    if level >= 2:
                        sums[0].add_(losses.detach().sum())
                    else:
                        sums[0].add_(loss.detach(), alpha=len(yb))
                    sums[1].add_((out.argmax(1) == yb).sum())
            stats.reduce()
            _lean_validate(model, val, None, _zeros("cpu"))
            torch.stack(sums).tolist()

    return run_fit if level == len(OVERHEAD_STEPS) - 1 else run_lean
