"""--streaming: parquet shards streamed per rank and worker, killed mid-epoch and resumed at the same world
size with every sample of the epoch trained exactly once; regression and multi-label streams too."""

import json
import signal

import datasets
import numpy as np
import pytest
import torch

from launcher.checkpoint import list_checkpoints, read_trainer_state
from launcher.checkpoint.rank_state import read_rank_file
from launcher.data import make_loader
from launcher.errors import UsageError
from launcher.data.streaming import load_stream_splits
from tests.helpers import (
    assert_same_weights,
    comparable,
    final_weights,
    make_env,
    read_metrics,
    run,
    signal_tree,
    start,
    wait_for,
)

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


# The probe model records every training-mode forward; DDP's unused-parameter probe (one forward on a
# validation batch before training) would count as one, so it is switched off: this model uses every parameter.
ARGS = ["--streaming", "--model", "tests.stream_probe:factory", "--epochs", "1", "--batch-size", "8",
        "--num-workers", "2", "--shuffle-buffer", "64", "--save-every-steps", "3", "--scheduler", "constant",
        "--find-unused-parameters", "off"]


@pytest.mark.slow
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
    assert 0 < step < ROWS // 16  # killed mid-epoch
    # Each rank's position is in its own file of the checkpoint, not gathered into the shared state.
    assert "loader_states" not in state["extra"]
    positions = [read_rank_file(checkpoint, rank).loader for rank in (0, 1)]
    assert [p["world_size"] for p in positions] == [2, 2] and all(sum(p["consumed"].values()) for p in positions)
    result = run(args, nproc=2, env=make_env(STREAM_PROBE_DIR=str(second)), timeout=240)
    assert f"step {step}" in result.stdout
    ids = seen_ids(first, keep_until=step) + seen_ids(second)
    assert sorted(ids) == list(range(ROWS))  # every sample of the epoch exactly once, across the kill
    (row,) = read_metrics(out)
    assert row["epoch"] == 1 and 0.0 <= row["val_accuracy"] <= 1.0  # validated on the map-style split


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_splits_and_loader_in_process(shards, workers):
    splits = load_stream_splits(str(shards), seed=0, buffer=16)
    assert splits.input_shape == (2,) and splits.num_classes == 2 and len(splits.val) == 40
    loader = make_loader(splits.train, 16, shuffle=True, num_workers=workers)
    assert len(loader) == ROWS // 16
    mean, std = ids_stats()
    ids = [int(round(v * std + mean)) for x, _ in loader for v in x[:, 0].tolist()]
    assert sorted(ids) == list(range(ROWS)) and ids != sorted(ids)  # all rows once, shuffled
    assert loader.state_dict()["done"] and sum(loader.state_dict()["consumed"].values()) == ROWS


def test_too_few_shards_for_processes_and_workers_is_one_clear_line(shards):
    splits = load_stream_splits(str(shards), seed=0)
    with pytest.raises(UsageError, match=r"^--streaming: 8 shard\(s\) cannot feed 1 process\(es\) x 9 worker\(s\) "
                                         r"without repeating data; write the data as at least 9 files"):
        make_loader(splits.train, 8, shuffle=True, num_workers=9)


def test_streamed_images_are_decoded_per_batch(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n, shards in (("train", 32, 4), ("validation", 8, 1)):
        (tmp_path / split).mkdir()
        for s in range(shards):
            pics = [Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)) for _ in range(n // shards)]
            ds = datasets.Dataset.from_dict({"image": pics, "label": [i % 3 for i in range(n // shards)]})
            ds.cast_column("image", datasets.Image()).to_parquet(str(tmp_path / split / f"p{s}.parquet"))
    splits = load_stream_splits(str(tmp_path), seed=0, buffer=8)
    assert splits.input_shape == (3, 6, 6) and len(splits.val) == 8
    batches = list(make_loader(splits.train, 8, shuffle=True, num_workers=2))
    assert sum(len(y) for _, y in batches) == 32 and batches[0][0].shape == (8, 3, 6, 6)
    x, _ = splits.val.__getitems__(list(range(8)))
    assert x.shape == (8, 3, 6, 6) and x.dtype == torch.float32


def test_streaming_needs_train_and_validation_shards(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(UsageError, match="expected shard files in .*/train/ and .*/validation/"):
        load_stream_splits(str(tmp_path), seed=0)


@pytest.mark.slow
def test_streaming_reads_the_hub_layout_in_two_processes(shards, tmp_path):
    """A downloaded Hub dataset (data/train-00000-of-00004.parquet): what the non-streaming path reads."""
    (tmp_path / "data").mkdir()
    for i, group in enumerate(np.array_split(sorted((shards / "train").glob("*.parquet")), 4)):
        datasets.concatenate_datasets([datasets.Dataset.from_parquet(str(f)) for f in group]).to_parquet(
            str(tmp_path / "data" / f"train-{i:05d}-of-00004.parquet"))
    datasets.Dataset.from_parquet(str(shards / "validation" / "part-000.parquet")).to_parquet(
        str(tmp_path / "data" / "validation-00000-of-00001.parquet"))
    out = tmp_path / "run"
    run(["--dataset", str(tmp_path), "--streaming", "--epochs", "1", "--batch-size", "16", "--scheduler",
         "constant", "--output-dir", str(out)], 2)
    [row] = read_metrics(out)
    assert row["train_samples"] == ROWS and row["val_samples"] == 40 and row["world_size"] == 2


@pytest.fixture(scope="module")
def task_shards(tmp_path_factory):
    """scikit-learn's diabetes (float target: regression) and 6 features with lists of tag ids
    (Sequence(ClassLabel): multi-label), each as 4 training shards and a validation split."""
    from sklearn.datasets import load_diabetes

    root = tmp_path_factory.mktemp("task-streams")
    frame = load_diabetes(as_frame=True).frame
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6))
    features = datasets.Features({**{f"f{i}": datasets.Value("float64") for i in range(6)},
                                  "labels": datasets.Sequence(datasets.ClassLabel(names=list("abcd")))})
    multi = datasets.Dataset.from_dict({**{f"f{i}": x[:, i] for i in range(6)},
                                        "labels": [[int(i) for i in np.flatnonzero(r[:4] > 0.3)] for r in x]},
                                       features=features)
    for name, table, train_rows in (("diabetes", datasets.Dataset.from_pandas(frame), 320), ("multi", multi, 240)):
        for split in ("train", "validation"):
            (root / name / split).mkdir(parents=True)
        for s, part in enumerate(np.array_split(np.arange(train_rows), 4)):
            table.select(part).to_parquet(str(root / name / "train" / f"part-{s:03d}.parquet"))
        table.select(range(train_rows, len(table))).to_parquet(str(root / name / "validation" / "part-000.parquet"))
    return root


@pytest.mark.slow
def test_streaming_regression_resumes_bit_identical_and_multi_label_trains(task_shards, tmp_path):
    """--streaming detects the problem type as the map-style path does: a regression (targets standardized
    with the stream's first rows, metrics in the label's units) killed mid-epoch on 2 processes resumes to
    the uninterrupted run's weights and rows; a multi-label stream reports its own metrics."""
    args = ["--streaming", "--model", "tests.stream_probe:factory", "--epochs", "2", "--batch-size", "8",
            "--shuffle-buffer", "64", "--save-every-steps", "3", "--scheduler", "constant", "--lr", "1e-2",
            "--find-unused-parameters", "off", "--dataset"]
    regression = [*args, str(task_shards / "diabetes")]
    (tmp_path / "probe").mkdir()
    env = make_env(STREAM_PROBE_DIR=str(tmp_path / "probe"))
    clean = tmp_path / "clean"
    assert "problem type: regression (float64 values" in run([*regression, "--output-dir", str(clean)], nproc=2,
                                                               env=env).stdout
    killed = tmp_path / "killed"
    proc = start([*regression, "--output-dir", str(killed)], nproc=2, env={**env, "STREAM_PROBE_SLEEP": "0.1"})
    reached = wait_for(lambda: len(list_checkpoints(killed)) >= 1, timeout=180, proc=proc)
    signal_tree(proc.pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=60)
    assert reached, output[-3000:]
    assert "resumed from" in run([*regression, "--output-dir", str(killed)], nproc=2, env=env).stdout
    assert_same_weights(final_weights(killed), final_weights(clean))
    assert comparable(read_metrics(killed)) == comparable(read_metrics(clean))
    row = read_metrics(clean)[-1]
    assert row["val_samples"] == 442 - 320 and row["val_mae"] > 1 and "val_accuracy" not in row  # label units
    out = tmp_path / "multi"
    result = run([*args, str(task_shards / "multi"), "--output-dir", str(out)], nproc=2, env=env)
    assert "problem type: multi_label_classification (a list of class ids per row" in result.stdout
    row = read_metrics(out)[-1]
    assert row["val_samples"] == 60 and 0 <= row["val_exact_match"] <= 1 and "val_accuracy" not in row
    assert row["train_samples"] == 240  # every streamed row once an epoch
