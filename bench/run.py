"""Benchmark launcher's `fit` against the leanest hand-written loop and its peers, side by side.

    python bench/run.py                     # everything: about 3 minutes on 2 idle CPU cores, 6 on busy ones
    python bench/run.py --sections loops --workloads mlp --repeats 3
    python bench/run.py --smoke             # seconds: tiny data, one repeat (what the smoke test runs)
    python bench/run.py --device cuda       # the loop comparison on a GPU (the other sections stay on CPU)

Every loop trains the same model from the same initial weights on the same tensors with the same batch
size, optimizer and seed (bench/workloads.py, bench/loops.py). Loops run interleaved, in a new order each
repeat, so a burst of load from elsewhere on the machine hits every loop alike; the tables report medians.
An epoch is timed from the end of the previous epoch's validation to the end of its own (the first epoch of
every run is a warm-up and is dropped), on the wall clock and on this process's CPU clock. On a shared
machine the CPU clock is the steadier one: it does not count time other processes held our core.

Sections: loops (the main table), overhead (fit's per-step cost, added step by step), eval (validation
alone), loader (samples/s of the loaders alone), scaling (1 vs 2 gloo processes, bytes all-reduced per
evaluation), startup (accelerate launch to the first training step), checkpoint (CheckpointManager.save vs
torch.save). Results go to --out as JSON; the tables
are printed as Markdown (bench/RESULTS.md records a full run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/run.py` from anywhere
    sys.path.insert(0, str(ROOT))

SECTIONS = ("loops", "overhead", "eval", "loader", "scaling", "startup", "checkpoint")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--workloads", default="mlp,cnn", help="comma-separated: mlp, cnn")
    p.add_argument("--variants", default=None, help="comma-separated loop names (default: all)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats per loop (default: mlp 10, cnn 6)")
    p.add_argument("--epochs", type=int, default=None, help="timed epochs per run, after one warm-up epoch "
                                                             "(default: mlp 3, cnn 2)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (and OMP_NUM_THREADS) for every "
                                                          "loop; 1 keeps a shared machine's noise down")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the loops section; the rest runs on CPU)")
    p.add_argument("--cnn-samples", type=int, default=640, help="images in the CNN workload (train + val)")
    p.add_argument("--mlp-samples", type=int, default=None, help="cap on the MLP workload's images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results.json"), help="where the JSON results go")
    p.add_argument("--smoke", action="store_true", help="tiny data, one repeat, one timed epoch: checks the "
                                                        "plumbing, not the speed")
    return p.parse_args(argv)


def set_threads(threads: int) -> None:
    # Before torch is imported where possible; Lightning would otherwise pick its own thread count.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)


def machine_info(args: argparse.Namespace) -> dict:
    import accelerate
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "accelerate": accelerate.__version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": args.threads,
            "device": args.device}
    try:
        import lightning

        info["lightning"] = lightning.__version__
    except ImportError:
        info["lightning"] = None
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        info["cpu"] = platform.processor()
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ------------------------------------------------------------------------------------------ loops


def run_loops(args: argparse.Namespace, workloads: dict, variants: list[str]) -> dict:
    import torch

    from bench.loops import VARIANTS, reset_accelerate_state

    device = torch.device(args.device)
    rng = random.Random(args.seed)
    results = {}
    for name, w in workloads.items():
        repeats = args.repeats or (1 if args.smoke else {"mlp": 10, "cnn": 6}[name])
        epochs = args.epochs or (1 if args.smoke else {"mlp": 3, "cnn": 2}[name])
        per = {v: {"wall": [], "cpu": [], "final": None} for v in variants}
        print(f"\n[{name}] {w.description}; {repeats} repeats x {len(variants)} loops x ({epochs} + 1 warm-up) "
              f"epochs", flush=True)
        for r in range(repeats):
            order = variants[:]
            rng.shuffle(order)
            for v in order:
                reset_accelerate_state()
                run = VARIANTS[v][0](w, epochs + 1, args.seed, device)
                if torch.get_num_threads() != args.threads:  # a loop must not change the others' conditions
                    raise RuntimeError(f"{v} changed torch's thread count to {torch.get_num_threads()}")
                per[v]["wall"] += run.epoch_seconds(0)[1:]
                per[v]["cpu"] += run.epoch_seconds(1)[1:]
                per[v]["final"] = run.final
            print(f"  repeat {r + 1}/{repeats} done (load {load_average()})", flush=True)
        results[name] = {"description": w.description, "batch_size": w.batch_size,
                         "train_samples": len(w.splits.train), "val_samples": len(w.splits.val),
                         "repeats": repeats, "timed_epochs_per_run": epochs, "variants": summarize(per)}
    return results


def summarize(per: dict) -> dict:
    med = {v: {k: statistics.median(d[k]) for k in ("wall", "cpu")} for v, d in per.items()}
    low = {v: min(d["cpu"]) for v, d in per.items()}  # contention only ever adds time: min ~ uncontended
    out = {}
    for v, d in per.items():
        q1, _, q3 = statistics.quantiles(d["cpu"], n=4) if len(d["cpu"]) > 1 else (d["cpu"][0],) * 3
        row = {"wall_s": med[v]["wall"], "cpu_s": med[v]["cpu"], "cpu_min_s": low[v],
               "cpu_iqr_pct": (q3 - q1) / med[v]["cpu"] * 100,
               "wall_all": d["wall"], "cpu_all": d["cpu"], "final": d["final"]}
        for base in ("lean_tensors", "lean_loader", "lean_recipe_loader"):
            if base in med:
                row[f"cpu_x_{base}"] = med[v]["cpu"] / med[base]["cpu"]
                row[f"cpu_min_x_{base}"] = low[v] / low[base]
                row[f"wall_x_{base}"] = med[v]["wall"] / med[base]["wall"]
        out[v] = row
    return out


def loops_table(results: dict) -> str:
    from bench.loops import VARIANTS

    lines = []
    for name, res in results.items():
        lines += [f"\n**{name}**: {res['description']} ({res['train_samples']} train / {res['val_samples']} val; "
                  f"median of {res['repeats']} runs x {res['timed_epochs_per_run']} epochs)\n",
                  "| loop | epoch s (CPU, median) | spread (IQR) | x lean loop, same loader (median / min) | "
                  "x leanest loop, tensors (median / min) | epoch s (wall) | val acc |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for v, row in res["variants"].items():
            same = "lean_recipe_loader" if v in ("launcher_recipe", "lean_recipe_loader") else "lean_loader"
            same_x = "" if v == "lean_tensors" else _x2(row, same)
            lines.append(f"| {v}: {VARIANTS[v][1]} | {row['cpu_s']:.3f} | {row['cpu_iqr_pct']:.0f}% | {same_x} | "
                         f"{_x2(row, 'lean_tensors')} | {row['wall_s']:.3f} | "
                         f"{row['final'].get('val_accuracy', float('nan')):.3f} |")
    return "\n".join(lines)


def _x2(row: dict, base: str) -> str:
    if f"cpu_x_{base}" not in row:
        return ""
    return f"{row[f'cpu_x_{base}']:.3f}x / {row[f'cpu_min_x_{base}']:.3f}x"


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    from bench import extras
    from bench.loops import VARIANTS
    from bench.workloads import build_workloads

    sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    unknown += [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"bench.py: error: unknown section or loop {', '.join(unknown)}", file=sys.stderr)
        return 2
    if args.smoke:
        args.mlp_samples, args.cnn_samples = args.mlp_samples or 400, min(args.cnn_samples, 96)

    started = time.perf_counter()
    out: dict = {"machine": machine_info(args), "load_average_start": load_average(),
                 "args": vars(args), "sections": {}}
    workloads = build_workloads(args.workloads.split(","), mlp_samples=args.mlp_samples,
                                cnn_samples=args.cnn_samples, seed=args.seed)
    tables = []
    if "loops" in sections:
        out["sections"]["loops"] = run_loops(args, workloads, variants)
        tables.append("### Epoch time (train + validation)\n" + loops_table(out["sections"]["loops"]))
    for section in SECTIONS[1:]:
        if section in sections:
            print(f"\n[{section}]", flush=True)
            result, table = getattr(extras, section)(args, workloads)
            out["sections"][section] = result
            tables.append(table)
    out["load_average_end"] = load_average()
    out["total_seconds"] = time.perf_counter() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    m = out["machine"]
    print(f"\n## Results\n\nMachine: {m['cpu']}, {m['cpu_count']} cores, {m['threads']} torch thread(s), "
          f"device {m['device']}; torch {m['torch']}, accelerate {m['accelerate']}, lightning {m['lightning']}; "
          f"load average {out['load_average_start']} -> {out['load_average_end']}; "
          f"bench took {out['total_seconds']:.0f} s\n")
    print("\n\n".join(tables))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
