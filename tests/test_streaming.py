"""--streaming: parquet shards streamed per rank and worker, killed mid-epoch and resumed at the same world
size with every sample of the epoch trained exactly once."""

import json
import signal

import datasets
import numpy as np
import pytest

from launcher.checkpoint import list_checkpoints, read_trainer_state
from tests.helpers import make_env, read_metrics, run, signal_tree, start, wait_for

pytestmark = pytest.mark.slow

ROWS, SHARDS = 512, 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """8 training shards of 64 rows (feature 'id' = the row's id) and a validation split."""
    root = tmp_path_factory.mktemp("stream")
    ids = np.arange(ROWS, dtype=np.float64)
    rng = np.random.default_rng(0)
    (root / "train").mkdir()
    (root / "validation").mkdir()
    per = ROWS // SHARDS
    for s in range(SHARDS):
        part = ids[s * per:(s + 1) * per]
        datasets.Dataset.from_dict({"id": part, "noise": rng.normal(size=per), "label": (part % 2).astype(int)}
                                   ).to_parquet(str(root / "train" / f"part-{s:03d}.parquet"))
    datasets.Dataset.from_dict({"id": np.arange(40.0), "noise": rng.normal(size=40), "label": np.arange(40) % 2}
                               ).to_parquet(str(root / "validation" / "part-000.parquet"))
    return root


def seen_ids(probe_dir, keep_until=None):
    """Sample ids trained per run file; a killed run's forwards after its last checkpoint are dropped."""
    mean, std = ids_stats()
    out = []
    for path in sorted(probe_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if keep_until is None or rec["k"] <= keep_until:
                out.extend(int(round(x * std + mean)) for x in rec["x"])
    return out


def ids_stats():
    ids = np.arange(ROWS, dtype=np.float64)  # the statistics come from the stream's first 512 rows: all of them
    return ids.mean(), ids.std()


ARGS = ["--streaming", "--model", "tests.stream_probe:factory", "--epochs", "1", "--batch-size", "8",
        "--num-workers", "2", "--shuffle-buffer", "64", "--save-every-steps", "3", "--scheduler", "constant"]


def test_streaming_killed_and_resumed_sees_every_sample_once(shards, tmp_path):
    out, first, second = tmp_path / "run", tmp_path / "probe1", tmp_path / "probe2"
    first.mkdir()
    second.mkdir()
    args = [*ARGS, "--dataset", str(shards), "--output-dir", str(out)]
    proc = start(args, nproc=2, env=make_env(STREAM_PROBE_DIR=str(first), STREAM_PROBE_SLEEP="0.15"))
    reached = wait_for(lambda: len(list_checkpoints(out)) >= 2, timeout=180, proc=proc)
    signal_tree(proc.pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=60)
    assert reached, output[-3000:]
    checkpoint = out / "checkpoints" / list_checkpoints(out)[-1]
    state = read_trainer_state(checkpoint)
    step = state["global_step"]
    assert 0 < step < ROWS // 16 and len(state["extra"]["loader_states"]) == 2  # killed mid-epoch
    result = run(args, nproc=2, env=make_env(STREAM_PROBE_DIR=str(second)), timeout=240)
    assert f"step {step}" in result.stdout
    ids = seen_ids(first, keep_until=step) + seen_ids(second)
    assert sorted(ids) == list(range(ROWS))  # every sample of the epoch exactly once, across the kill
    (row,) = read_metrics(out)
    assert row["epoch"] == 1 and 0.0 <= row["val_accuracy"] <= 1.0  # validated on the map-style split


def test_too_few_shards_for_processes_and_workers_is_one_clear_line(shards, tmp_path):
    args = [*ARGS, "--dataset", str(shards), "--num-workers", "5", "--output-dir", str(tmp_path / "run")]
    result = run(args, nproc=2, env=make_env(STREAM_PROBE_DIR=str(tmp_path)), check=False, timeout=180)
    assert result.returncode != 0
    assert "error: --streaming: 8 shard(s) cannot feed 2 process(es) x 5 worker(s) without repeating data" \
        in result.stdout
    assert not (tmp_path / "run").exists()
