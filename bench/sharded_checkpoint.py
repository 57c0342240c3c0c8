"""Sharded (FSDP2 + DCP) checkpoints against today's rank-0 checkpoints: save/load time and host memory per rank.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 bench/sharded_checkpoint.py \\
        --mode sharded --out /tmp/ckbench        # also: --mode rank0, gathered, async
    python bench/sharded_checkpoint.py --all --out /tmp/ckbench   # every mode in fresh processes, a table

A ~100M-parameter MLP (12 x Linear(2896, 2896), fp32: 403 MB of weights, 806 MB of AdamW state) takes one
AdamW step so the optimizer state exists, then saves twice and loads once through the launcher's own code:
`CheckpointManager.save` on a DDP model (rank 0 writes, as today: "rank0"), the same rank-0 files from an
FSDP2 model whose full model and optimizer state are gathered onto rank 0 first (what today's format would
cost under FSDP: "gathered"), `launcher.checkpoint.sharded.save_sharded` on an FSDP2 model (every rank writes its
shards: "sharded"), or `dcp.async_save` of the same shards ("async", measured, not used by the launcher).
Each mode runs in fresh processes, so memory is per mode. Memory
is the resident set sampled every 5 ms during the operation, minus the resident set just before it: what
the checkpoint itself costs on that rank (ru_maxrss, the lifetime peak, is reported too).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from launcher.faults.gloo_exit import settle_gloo_workers_at_exit  # noqa: E402

WIDTH, DEPTH = 2896, 12
MB = 1 << 20
MODES = ("rank0", "gathered", "sharded", "async")


class PeakRSS:
    """Peak resident set of this process above its level at entry, sampled in a thread."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.proc = interval, psutil.Process()

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.started = time.perf_counter()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.started
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.extra_mb = (self.peak - self.base) / MB


def build():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH)])


def one_step(model, optimizer):
    model(torch.randn(4, WIDTH)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def worker(mode: str, out: Path) -> None:
    from launcher.checkpoint import CheckpointManager, TrainerState, load_checkpoint
    from launcher.checkpoint.sharded import get_model_state_dict, get_optimizer_state_dict, load_sharded, save_sharded

    settle_gloo_workers_at_exit()  # else a gloo worker can abort the process at exit (launcher.faults.gloo_exit)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = build()
    params = sum(p.numel() for p in model.parameters())
    if mode == "rank0":
        model = nn.parallel.DistributedDataParallel(model)
        inner = model.module
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        inner = model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    one_step(model, optimizer)
    run_dir = out / mode
    manager = CheckpointManager(run_dir, keep_last=10, is_main=rank == 0)
    result = {"mode": mode, "rank": rank, "params": params, "rss_before_mb": psutil.Process().memory_info().rss / MB}
    saves = []
    for step in (1, 2):
        dist.barrier()
        state = TrainerState(global_step=step, world_size=dist.get_world_size())
        with PeakRSS() as m:
            if mode == "rank0":
                path = manager.save(state, model_state=inner.state_dict(), optimizer=optimizer)
            elif mode == "gathered":
                path = gathered_save(manager, state, model, optimizer)
            elif mode == "sharded":
                path = save_sharded(manager, state, model=model, optimizer=optimizer)
            else:
                path = async_save(run_dir, step, model, optimizer, get_model_state_dict, get_optimizer_state_dict, m)
        saves.append({"seconds": m.seconds, "extra_mb": m.extra_mb, **getattr(m, "async_info", {})})
    result["saves"] = saves
    result["checkpoint_mb"] = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / MB
    if mode in ("rank0", "sharded"):
        dist.barrier()
        with PeakRSS() as m:
            if mode == "rank0":
                load_checkpoint(path, model=inner, optimizer=optimizer, rank=rank)
            else:
                load_sharded(path, model=model, optimizer=optimizer, rank=rank)
        result["load"] = {"seconds": m.seconds, "extra_mb": m.extra_mb}
        if mode == "sharded" and rank == 0:
            from launcher.checkpoint import _sha256

            started = time.perf_counter()
            for f in (Path(path) / "dcp").iterdir():
                _sha256(f)
            result["sha256_all_shards_seconds"] = time.perf_counter() - started
    result["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / f"{mode}-rank{rank}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def gathered_save(manager, state, model, optimizer):
    """Today's rank-0 files from an FSDP model: everything gathered whole onto rank 0's CPU, then written."""
    from types import SimpleNamespace

    from launcher.checkpoint.sharded import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=full)
    osd = get_optimizer_state_dict(model, optimizer, options=full)
    return manager.save(state, model_state=msd, optimizer=SimpleNamespace(state_dict=lambda: osd))


def async_save(run_dir, step, model, optimizer, get_msd, get_osd, meter):
    """dcp.async_save: the time training is blocked (staging to host memory) and the time to completion."""
    import torch.distributed.checkpoint as dcp

    path = run_dir / f"async-{step}"
    shards = {"model": get_msd(model), "optimizer": get_osd(model, optimizer)}
    started = time.perf_counter()
    future = dcp.async_save(shards, checkpoint_id=path / "dcp")
    blocked = time.perf_counter() - started
    future.result()
    dist.barrier()  # a commit may only happen once every rank's write finished
    meter.async_info = {"blocked_seconds": blocked, "completed_seconds": time.perf_counter() - started}
    return path


def run_all(out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    rows = []
    for mode in MODES:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(29000 + os.getpid() % 1000), __file__, "--mode", mode,
                        "--out", str(out)], env=env, check=True)
        rows += [json.loads((out / f"{mode}-rank{r}.json").read_text()) for r in (0, 1)]
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print("| mode | rank | RSS before MB | save s (1st, 2nd) | save extra RSS MB | load s | load extra RSS MB "
          "| ru_maxrss MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        saves = r["saves"]
        save_s = ", ".join(f"{s['seconds']:.2f}" for s in saves)
        if r["mode"] == "async":
            save_s = ", ".join(f"blocked {s['blocked_seconds']:.2f} / done {s['completed_seconds']:.2f}" for s in saves)
        load = r.get("load", {})
        extra = max(s["extra_mb"] for s in saves)
        print(f"| {r['mode']} | {r['rank']} | {r['rss_before_mb']:.0f} | {save_s} | {extra:.0f} | "
              f"{load.get('seconds', float('nan')):.2f} | {load.get('extra_mb', float('nan')):.0f} | "
              f"{r['ru_maxrss_mb']:.0f} |")
    print(f"params {rows[0]['params'] / 1e6:.1f} M; checkpoint sizes MB: "
          + ", ".join(f"{r['mode']} {r['checkpoint_mb']:.0f}" for r in rows if r["rank"] == 0))
    sha = [r["sha256_all_shards_seconds"] for r in rows if "sha256_all_shards_seconds" in r]
    if sha:
        print(f"sha256 of all shard files on one rank: {sha[0]:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=MODES)
    parser.add_argument("--all", action="store_true", help="run every mode in fresh processes and print a table")
    parser.add_argument("--out", type=Path, required=True, help="scratch folder for the checkpoints and results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.all:
        run_all(args.out)
    else:
        worker(args.mode, args.out)


if __name__ == "__main__":
    main()
