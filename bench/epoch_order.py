"""The epoch order at 10^8 samples: what an epoch's start costs a rank, and a rank's whole share.

    python bench/epoch_order.py                 # 10^8 samples, 3 interleaved A/B pairs
    python bench/epoch_order.py --samples 1e7 --pairs 1

A ("randperm"): the order every dataset below `RANDPERM_LIMIT` samples gets, `torch.randperm` of the whole
dataset on every rank (what every dataset got before). B ("bijection"): the keyed bijection the sampler uses
at and above the limit, evaluated at the rank's own positions a chunk at a time. Each measurement runs in a
fresh process (peak RSS is per process): the time to the first batch of an epoch, the peak RSS above the
interpreter's baseline, and the time for a rank's whole share of the epoch at 1,000 ranks (10^5 samples).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(samples: int, variant: str, batch_size: int, world: int) -> dict:
    import torch

    from launcher.data.sampling import RANDPERM_LIMIT, ElasticBatchSampler

    torch.set_num_threads(1)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    limit = samples + 1 if variant == "randperm" else min(RANDPERM_LIMIT, samples)
    sampler = ElasticBatchSampler(samples, batch_size, seed=0, randperm_limit=limit)
    sampler.set_epoch(1)
    started = time.perf_counter()
    first = next(iter(sampler))
    start_s = time.perf_counter() - started
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    assert len(first) == batch_size
    # One rank of `world`: its share of the whole epoch (every global batch's slice).
    rank = ElasticBatchSampler(samples, batch_size, rank=world // 2, world_size=world, seed=0, randperm_limit=limit)
    rank.set_epoch(1)
    started = time.perf_counter()
    count = sum(len(b) for b in rank)
    share_s = time.perf_counter() - started
    return {"variant": variant, "samples": samples, "first_batch_s": round(start_s, 4),
            "peak_rss_mb": round(peak_mb, 1), "world": world, "share_samples": count,
            "share_s": round(share_s, 4),
            "peak_rss_total_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=float, default=1e8)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--world", type=int, default=1000, help="the share measured is one rank's of this many")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(int(args.samples), args.one, args.batch_size, args.world)))
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    rows = []
    for _ in range(args.pairs):
        for variant in ("randperm", "bijection"):  # interleaved: A, B, A, B, ...
            out = subprocess.run([sys.executable, __file__, "--samples", str(args.samples), "--batch-size",
                                  str(args.batch_size), "--world", str(args.world), "--one", variant],
                                 env=env, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout))
            print(json.dumps(rows[-1]), flush=True)
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
