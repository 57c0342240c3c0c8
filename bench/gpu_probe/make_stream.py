"""The embedded digits as parquet shards for --streaming (DATASET/train/part-NNN.parquet, DATASET/validation/):
python make_stream.py OUT_DIR [SHARDS]. Needs scikit-learn and pyarrow only (no datasets)."""

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.datasets import load_digits


def main() -> None:
    out, shards = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 8
    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    val = len(y) // 5
    for split, (xs, ys), parts in (("validation", (x[:val], y[:val]), 1), ("train", (x[val:], y[val:]), shards)):
        (out / split).mkdir(parents=True, exist_ok=True)
        for i, rows in enumerate(np.array_split(np.arange(len(ys)), parts)):
            table = pa.table({**{f"f{j}": xs[rows, j] for j in range(xs.shape[1])}, "label": ys[rows]})
            pq.write_table(table, out / split / f"part-{i:03d}.parquet")
    print(f"wrote {len(y) - val} training rows in {shards} shards and {val} validation rows to {out}")


if __name__ == "__main__":
    main()
