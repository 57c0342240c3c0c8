"""What the hang watchdog (launcher.faults.watchdog) costs per step: fit in 2 gloo processes with and without it.

    python bench/watchdog.py                # about 2 minutes on 2 busy cores
    python bench/watchdog.py --repeats 2 --workload cnn

The MLP workload is the one where per-step costs show (a step is ~0.5 ms). Runs alternate, with and
without, so load from elsewhere on the machine hits both alike; the table reports the median and the best
samples/s of the timed epochs over the repeats. Results go to bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.extras import _launch  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per run (after one warm-up epoch)")
    p.add_argument("--workload", default="mlp", choices=("mlp", "cnn"))
    args = p.parse_args(argv)
    rates: dict[str, list[float]] = {"with watchdog": [], "without": []}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        for repeat in range(args.repeats):
            order = list(rates) if repeat % 2 == 0 else list(rates)[::-1]
            for key in order:
                flags = [] if key == "with watchdog" else ["--no-watchdog"]
                _launch(ROOT / "bench" / "dist_worker.py", ["--out", str(out), "--workload", args.workload,
                                                              "--epochs", str(args.epochs + 1), *flags], 2, 1)
                rates[key].append(json.loads(out.read_text())["samples_per_s"])
    print(f"### Hang watchdog: fit in 2 gloo processes, {args.workload} workload, {args.repeats} runs each\n")
    print("| fit | median samples/s | best samples/s | runs |")
    print("|---|---:|---:|---|")
    for key, values in rates.items():
        print(f"| {key} | {statistics.median(values):.0f} | {max(values):.0f} | "
              f"{', '.join(f'{v:.0f}' for v in values)} |")


if __name__ == "__main__":
    main()
