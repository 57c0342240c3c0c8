"""Scale bench: what the loop adds per optimizer step, per checkpoint and per resume, at 1, 2, 4 and 8 processes.

    python bench/scale.py                      # this checkout
    python bench/scale.py --code /work/main    # another checkout (e.g. before a change), same script
    python bench/scale.py --worlds 1 2 --json out.json
    python bench/scale.py --streaming          # the same with a --streaming loader (each rank's position)

Every Python-level torch.distributed call is counted (bench/scale_worker.py), with what each rank receives in
it, and sha256 over checkpoint files; save and resume times are rank 0's wall clock. Over gloo on a few CPU
cores the times say little about a thousand GPUs; the counts and bytes are what scale (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "bench" / "scale_worker.py"


def write_shards(root: Path, rows: int, classes: int, shards: int = 8) -> None:
    """Parquet shards for --streaming: `rows` training rows of 32 features in `shards` files, a validation split."""
    import datasets
    import numpy as np

    rng = np.random.default_rng(0)
    for split, n, files in (("train", rows, shards), ("validation", 64, 1)):
        (root / split).mkdir(parents=True)
        for s in range(files):
            x = rng.normal(size=(n // files, 32))
            columns = {f"f{i:02d}": x[:, i] for i in range(32)}
            datasets.Dataset.from_dict({**columns, "label": rng.integers(0, classes, n // files)}).to_parquet(
                str(root / split / f"part-{s:03d}.parquet"))


def run_world(world: int, code: Path, classes: int, steps: int, save_every: int,
              streaming: bool = False) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        extra = []
        if streaming:  # 8 per batch, `steps` batches per rank, 8 shards: any world size up to 8 splits them evenly
            write_shards(Path(tmp) / "shards", steps * 8 * world, classes)
            extra = ["--streaming", str(Path(tmp) / "shards")]
        env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / "cpu_ddp.yaml"), "--num_processes", str(world),
               "--main_process_port", str(29600 + world), str(WORKER), "--out", tmp, "--classes", str(classes),
               "--steps", str(steps), "--save-every", str(save_every), *extra]
        proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise SystemExit(f"world {world} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return [json.loads((Path(tmp) / f"rank-{r}.json").read_text()) for r in range(world)]


def summarize(ranks: list[dict]) -> dict:
    """Per phase: collectives (rank 0's count; every rank makes the same calls), the most bytes any rank
    received, files/bytes hashed (the most of any rank, and the sum over ranks), rank 0's seconds."""
    first = ranks[0]
    phases = sorted({p for r in ranks for p in r["counts"]})
    out = {"world": first["world"], "steps": first["steps"], "step_saves": first["step_saves"],
           "epoch_saves": first["epoch_saves"], "phases": {}}
    for phase in phases:
        buckets = [r["counts"].get(phase, {}) for r in ranks]
        b0 = buckets[0]
        out["phases"][phase] = {
            "collectives": b0.get("collectives", 0), "by_name": b0.get("by_name", {}),
            "max_bytes_received": max(b.get("bytes_received", 0) for b in buckets),
            "sha256_bytes_max_rank": max(b.get("sha256_bytes", 0) for b in buckets),
            "sha256_bytes_all_ranks": sum(b.get("sha256_bytes", 0) for b in buckets),
            "seconds_rank0": round(b0.get("seconds", 0.0), 3)}
    return out


def table(results: list[dict]) -> str:
    lines = ["| world | collectives / step | per step save | per epoch save | bytes recv / step save (max rank) | "
             "resume: collectives | resume: sha256 MB (all ranks) | step save s | resume s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        ph = r["phases"]
        steps = ph.get("steps", {})
        step_save, epoch_save = ph.get("save_step", {}), ph.get("save_epoch", {})
        choose, fit_resume = ph.get("resume_choose", {}), ph.get("resume_fit", {})
        n_step, n_epoch = max(r["step_saves"], 1), max(r["epoch_saves"], 1)
        resume_coll = choose.get("collectives", 0) + fit_resume.get("collectives", 0)
        hashed = (choose.get("sha256_bytes_all_ranks", 0) + fit_resume.get("sha256_bytes_all_ranks", 0)) / 1e6
        lines.append(
            f"| {r['world']} | {steps.get('collectives', 0) / r['steps']:.2f} | "
            f"{step_save.get('collectives', 0) / n_step:.0f} | {epoch_save.get('collectives', 0) / n_epoch:.0f} | "
            f"{step_save.get('max_bytes_received', 0) / n_step:,.0f} | {resume_coll} | {hashed:.2f} | "
            f"{step_save.get('seconds_rank0', 0) / n_step:.3f} | "
            f"{choose.get('seconds_rank0', 0) + fit_resume.get('seconds_rank0', 0):.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--code", type=Path, default=ROOT, help="the checkout whose launcher/ is measured")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--classes", type=int, default=100, help="classes: the statistics are C*C+1 float64")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--json", type=Path, help="also write the raw summaries here")
    p.add_argument("--streaming", action="store_true", help="train with a --streaming loader over parquet shards")
    args = p.parse_args()
    results = [summarize(run_world(w, args.code.resolve(), args.classes, args.steps, args.save_every,
                                   args.streaming)) for w in args.worlds]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
