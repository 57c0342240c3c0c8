"""launcher.data on real datasets written to disk the way users write them (no network, no mocks)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import ROOT
from launcher import data
from launcher.data import arrays, load_splits, make_loader
from launcher.errors import UsageError


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    """Each test builds its datasets in its own cache, as a fresh machine would."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def unstandardize(splits, x):
    view = (-1, 1, 1) if len(splits.input_shape) == 3 else (-1,)
    return x * torch.tensor(splits.std).reshape(view) + torch.tensor(splits.mean).reshape(view)


def whole(ds):
    return ds.__getitems__(list(range(len(ds))))


# --- the embedded default ------------------------------------------------------------------------------


def test_digits_loads_with_a_stratified_standardized_split():
    splits = load_splits("digits")
    assert (len(splits.train), len(splits.val)) == (1438, 359)
    assert splits.num_classes == 10 and splits.class_names == [str(i) for i in range(10)]
    assert splits.input_shape == (1, 8, 8) and splits.name == "digits"
    x, y = whole(splits.train)
    assert x.shape == (1438, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3  # train statistics
    # Pixel counts 0..16 were scaled to [0, 1] before standardizing.
    raw = unstandardize(splits, x)
    assert raw.min().item() == pytest.approx(0, abs=1e-5) and raw.max().item() == pytest.approx(1, abs=1e-5)
    # Every class keeps its share (~20%) in validation.
    val_counts = torch.bincount(splits.val.labels, minlength=10)
    all_counts = val_counts + torch.bincount(y, minlength=10)
    assert (val_counts - 0.2 * all_counts).abs().max() <= 1
    assert "stratified" in splits.val_source


def test_digits_are_scikit_learns_exactly_without_importing_it():
    from launcher.data.sources import digits_arrays

    images, labels = digits_arrays()
    code = "import sys, launcher.data.sources as s; s.digits_arrays(); print('sklearn' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.strip()
    from sklearn.datasets import load_digits

    bunch = load_digits()
    assert images.dtype == bunch.images.dtype and np.array_equal(images, bunch.images)
    assert np.array_equal(labels, bunch.target)
    assert imported == "False"


def test_same_seed_same_split_other_seed_other_split():
    a, b, c = load_splits("digits", seed=3), load_splits("digits", seed=3), load_splits("digits", seed=4)
    assert torch.equal(whole(a.val)[0], whole(b.val)[0]) and torch.equal(whole(a.train)[1], whole(b.train)[1])
    assert whole(a.val)[0].shape == whole(c.val)[0].shape
    assert not torch.equal(whole(a.val)[0], whole(c.val)[0])


def test_stratified_split_partitions_rows_by_class():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    train, val = data._stratified_split(labels, 0.2, seed=0)
    assert len(val) == 20 and len(np.intersect1d(train, val)) == 0
    assert sorted(np.concatenate([train, val])) == list(range(100))
    assert np.bincount(labels[val]).tolist() == [10, 6, 4]
    again, _ = data._stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(train, again)


# --- local image folders --------------------------------------------------------------------------------

COLOURS = {"cat": (255, 0, 0), "dog": (0, 0, 255)}


def write_image_folder(root, per_class=5):
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (12, 10), colour).save(root / name / f"{i}.png")
    # A grayscale image of another size: converted to RGB and resized to the first image's 12x10.
    Image.new("L", (7, 5), 128).save(root / "dog" / "gray.png")


def test_image_folder_classes_from_subfolders(tmp_path):
    write_image_folder(tmp_path / "pets")
    splits = load_splits(str(tmp_path / "pets"))
    assert splits.class_names == ["cat", "dog"] and splits.num_classes == 2
    assert splits.input_shape == (3, 10, 12)  # (C, H, W) of the first image
    assert len(splits.train) + len(splits.val) == 11
    x = torch.cat([whole(splits.train)[0], whole(splits.val)[0]])
    y = torch.cat([whole(splits.train)[1], whole(splits.val)[1]])
    pixels = unstandardize(splits, x)[:, :, 0, 0]  # every image is one solid colour
    seen = {tuple(round(v * 255) for v in p.tolist()) for p in pixels}
    assert seen == {(255, 0, 0), (0, 0, 255), (128, 128, 128)}
    assert all(y[i] == 0 for i in range(len(y)) if tuple(pixels[i].round(decimals=3).tolist()) == (1, 0, 0))


def test_image_folder_uses_its_test_split_for_validation(tmp_path):
    write_image_folder(tmp_path / "pets" / "train", per_class=4)
    write_image_folder(tmp_path / "pets" / "test", per_class=2)
    splits = load_splits(str(tmp_path / "pets"))
    assert (len(splits.train), len(splits.val)) == (9, 5) and splits.val_source == "split 'test'"


def test_grayscale_images_stay_one_channel(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "g" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (9, 9), 40 * i).save(tmp_path / "g" / name / f"{i}.png")
    assert load_splits(str(tmp_path / "g")).input_shape == (1, 9, 9)


# --- tabular files --------------------------------------------------------------------------------------

SPECIES = ["cat", "ant", "bee"]  # sorted: ant=0, bee=1, cat=2


def tabular_rows(n=30):
    rng = np.random.default_rng(0)
    names = [SPECIES[i % 3] for i in range(n)]
    # 'code' equals the class id of the sorted names, so the label mapping can be checked from the inputs.
    return {
        "code": [float(sorted(SPECIES).index(s)) for s in names],
        "noise": rng.normal(size=n).tolist(),
        "count": rng.integers(0, 9, n).tolist(),
        "label": names,
    }


def write_tabular(path):
    ds = datasets.Dataset.from_dict(tabular_rows())
    if path.suffix == ".csv":
        ds.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        ds.to_parquet(path)
    elif path.suffix == ".jsonl":
        ds.to_json(path)
    else:  # a JSON array of records
        path.write_text(json.dumps([dict(zip(ds.column_names, row)) for row in zip(*ds[:].values())]))


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".json", ".jsonl"])
def test_tabular_files_string_labels_and_numeric_features(tmp_path, suffix):
    path = tmp_path / f"animals{suffix}"
    write_tabular(path)
    splits = load_splits(str(path))
    assert splits.class_names == ["ant", "bee", "cat"] and splits.input_shape == (3,)
    assert (len(splits.train), len(splits.val)) == (24, 6)
    for part in (splits.train, splits.val):
        x, y = whole(part)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.allclose(unstandardize(splits, x)[:, 0], y.float(), atol=1e-5)
    x = whole(splits.train)[0]
    assert torch.allclose(x.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x.std(0, unbiased=False), torch.ones(3), atol=1e-4)


def test_folder_of_csv_files_with_split_names(tmp_path):
    folder = tmp_path / "animals"
    folder.mkdir()
    write_tabular(folder / "train.csv")
    write_tabular(folder / "validation.csv")
    splits = load_splits(str(folder))
    assert (len(splits.train), len(splits.val)) == (30, 30) and splits.val_source == "split 'validation'"


def test_loading_prints_nothing(tmp_path, capfd):
    write_tabular(tmp_path / "a.csv")
    write_image_folder(tmp_path / "pets")
    capfd.readouterr()
    load_splits(str(tmp_path / "a.csv"))
    load_splits(str(tmp_path / "pets"))  # decodes images through a cached datasets map
    assert capfd.readouterr() == ("", "")


# --- save_to_disk folders and column detection ----------------------------------------------------------


def array_dataset(n, shape=(6, 5, 3), label="label", seed=0):
    rng = np.random.default_rng(seed)
    return datasets.Dataset.from_dict(
        {"pixels": rng.integers(0, 256, (n, *shape), dtype=np.uint8), label: (np.arange(n) % 4).tolist()},
        features=datasets.Features({"pixels": datasets.Array3D(shape, "uint8"), label: datasets.Value("int64")}),
    )


def test_saved_dataset_dict_with_validation_split(tmp_path):
    datasets.DatasetDict({"train": array_dataset(20), "validation": array_dataset(8, seed=1)}).save_to_disk(
        tmp_path / "dd"
    )
    splits = load_splits(str(tmp_path / "dd"))
    assert (len(splits.train), len(splits.val)) == (20, 8) and splits.val_source == "split 'validation'"
    # Channels-last uint8 arrays become (C, H, W) in [0, 1].
    assert splits.input_shape == (3, 6, 5)
    expected = torch.from_numpy(array_dataset(8, seed=1).with_format("numpy")[:]["pixels"]).permute(0, 3, 1, 2)
    assert torch.allclose(unstandardize(splits, whole(splits.val)[0]), expected / 255.0, atol=1e-5)
    assert splits.num_classes == 4 and splits.class_names == ["0", "1", "2", "3"]


def test_saved_dataset_without_splits_is_carved(tmp_path):
    array_dataset(20).save_to_disk(tmp_path / "ds")
    splits = load_splits(str(tmp_path / "ds"), val_fraction=0.25)
    assert (len(splits.train), len(splits.val)) == (15, 5)


def test_label_detection_prefers_class_label_then_known_names(tmp_path):
    ds = datasets.Dataset.from_dict(
        {"x": [0.0, 1.0, 2.0, 3.0], "label": [0, 0, 1, 1], "kind": [2, 1, 2, 0]},
        features=datasets.Features(
            {
                "x": datasets.Value("float32"),
                "label": datasets.Value("int64"),
                "kind": datasets.ClassLabel(names=["a", "b", "c"]),
            }
        ),
    )
    ds.save_to_disk(tmp_path / "cl")
    splits = load_splits(str(tmp_path / "cl"), val_fraction=0.5)
    assert splits.class_names == ["a", "b", "c"] and splits.input_shape == (2,)  # x and label are features
    datasets.Dataset.from_dict({"f": [1.0, 2.0, 3.0, 4.0], "Target": [1, 0, 1, 0]}).to_csv(tmp_path / "t.csv")
    assert load_splits(str(tmp_path / "t.csv"), val_fraction=0.5).input_shape == (1,)


def test_column_overrides(tmp_path):
    rng = np.random.default_rng(0)
    ds = datasets.Dataset.from_dict(
        {
            "vec": rng.normal(size=(12, 5)).tolist(),
            "label": [i % 2 for i in range(12)],
            "group": [i % 3 for i in range(12)],
        }
    )
    ds.save_to_disk(tmp_path / "v")
    splits = load_splits(str(tmp_path / "v"), image_column="vec", label_column="group")
    assert splits.input_shape == (5,) and splits.num_classes == 3
    x = unstandardize(splits, torch.cat([whole(splits.train)[0], whole(splits.val)[0]]))
    assert sorted(x[:, 0].tolist()) == pytest.approx(sorted(r[0] for r in ds["vec"]), abs=1e-5)


# --- bad input ------------------------------------------------------------------------------------------


def _csv(tmp_path, columns):
    datasets.Dataset.from_dict(columns).to_csv(tmp_path / "d.csv", index=False)
    return str(tmp_path / "d.csv")


def _parquet_with_missing_label(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"a": [1.0, 2.0, 3.0], "label": pa.array([0, None, 1], pa.int64())})
    pq.write_table(table, tmp_path / "d.parquet")
    return str(tmp_path / "d.parquet")


@pytest.mark.parametrize(
    ("make", "kwargs", "expected"),
    [
        (lambda p: str(p / "missing.csv"), {}, "does not exist"),
        (lambda p: str(p / "sub" / "dir" / "x"), {}, "does not exist"),
        (lambda p: (p / "notes.txt").write_text("hi") and str(p / "notes.txt"), {}, "use a .csv/"),
        (lambda p: (p / "empty").mkdir() or str(p / "empty"), {}, "could not read dataset"),
        (
            lambda p: (p / "bad.csv").write_text('a,label\n1,2\n"x,,\n') and str(p / "bad.csv"),
            {},
            "ParserError",
        ),
        (
            lambda p: _csv(p, {"a": [1.0, 2.0], "label": [0, 1]}),
            {"label_column": "lbl"},
            "--label-column 'lbl' is not a column of the dataset; available columns: a, label",
        ),
        (
            lambda p: _csv(p, {"a": [1.0, 2.0], "label": [0, 1]}),
            {"image_column": "img"},
            "--image-column 'img' is not a column",
        ),
        (lambda p: _csv(p, {"a": [1.0, 2.0], "b": [0, 1]}), {}, "no label column found"),
        (
            lambda p: _csv(p, {"a": [1.0, 2.0], "name": ["x", "y"], "label": [0, 1]}),
            {"categorical": False},  # one-hot encoded by default (tests/test_tables.py)
            "'name' (text) is not",
        ),
        # float labels are a regression unless classification is asked for
        (lambda p: _csv(p, {"a": [1.0, 2.0], "label": [0.5, 1.5]}), {"problem_type": "single_label_classification"},
         "label column 'label' holds float64"),
        (lambda p: _csv(p, {"a": [1.0, 2.0, 3.0], "label": [0, -1, 1]}), {}, "negative labels"),
        (
            lambda p: _parquet_with_missing_label(p),
            {},
            "label column 'label' has empty values in split 'train'",
        ),
        (
            lambda p: _csv(p, {"a": [1.0, 2.0, 3.0], "kind": ["x", None, "y"]}),
            {"label_column": "kind"},
            "label column 'kind' has empty values",
        ),
        (
            lambda p: _csv(p, {"a": [1.0, None, 3.0], "label": [0, 1, 1]}),
            {"impute": False},  # filled with the training mean by default (tests/test_tables.py)
            "feature column(s) a have missing",
        ),
        (lambda p: _csv(p, {"a": [1.0], "label": [0]}), {}, "at least 2 are needed"),
        (
            lambda p: _csv(p, {"a": [1.0, 2.0], "label": [0, 1]}),
            {"image_column": "a"},
            "holds single numbers",
        ),
        (
            lambda p: _csv(p, {"a": [1.0, 2.0], "label": ["x", "y"]}),
            {"image_column": "label", "label_column": "a", "problem_type": "single_label_classification"},
            "holds float64",
        ),
        (lambda p: _csv(p, {"label": [0, 1]}), {}, "no input columns"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, make, kwargs, expected):
    with pytest.raises(UsageError) as error:
        load_splits(make(tmp_path), **kwargs)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_ragged_arrays_are_refused(tmp_path):
    rows = [np.zeros((2, 4)).tolist()] * 5 + [np.zeros((4, 2)).tolist()]
    datasets.Dataset.from_dict({"pixels": rows, "label": [0, 1] * 3}).save_to_disk(tmp_path / "r")
    with pytest.raises(UsageError, match="do not all have the shape"):
        load_splits(str(tmp_path / "r"))


def test_unlabelled_test_split_is_refused(tmp_path):
    test = array_dataset(4).map(lambda row: {"label": -1})
    datasets.DatasetDict({"train": array_dataset(8), "test": test}).save_to_disk(tmp_path / "u")
    with pytest.raises(UsageError, match="split 'test' has negative labels"):
        load_splits(str(tmp_path / "u"))


def test_hub_name_offline_says_what_works_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError, match="could not find or load dataset 'someone/no-such-set'.*work offline"):
        load_splits("someone/no-such-set")


# --- batched access and loaders -------------------------------------------------------------------------


def multi_chunk_dataset(tmp_path):
    """A saved dataset whose Arrow table has several chunks, as large datasets do."""
    parts = [array_dataset(50, shape=(4, 4, 1), seed=s) for s in range(3)]
    datasets.concatenate_datasets(parts).save_to_disk(tmp_path / "chunks", max_shard_size="2KB")
    return str(tmp_path / "chunks")


def assert_batches_match_samples(ds):
    indices = [5, 0, len(ds) - 1, 5, 3]
    inputs, labels = ds.__getitems__(indices)
    assert inputs.shape[0] == labels.shape[0] == len(indices)
    for row, index in enumerate(indices):
        x, y = ds[index]
        assert torch.equal(inputs[row], x) and torch.equal(labels[row], y)


def test_getitems_matches_single_samples_in_memory_and_from_arrow(tmp_path, monkeypatch):
    path = multi_chunk_dataset(tmp_path)
    in_memory = load_splits(path)
    monkeypatch.setattr(arrays, "IN_MEMORY_MAX_BYTES", 0)
    streamed = load_splits(path)
    assert isinstance(in_memory.train, data.TensorBatchedDataset)
    assert isinstance(streamed.train, data.ArrowBatchedDataset)
    assert len(streamed.train.store.table.data.table.column("pixels").chunks) > 1
    for part in ("train", "val"):
        assert_batches_match_samples(getattr(in_memory, part))
        assert_batches_match_samples(getattr(streamed, part))
        a, b = whole(getattr(in_memory, part)), whole(getattr(streamed, part))
        assert torch.allclose(a[0], b[0], atol=1e-6) and torch.equal(a[1], b[1])
    assert in_memory.mean == pytest.approx(streamed.mean) and in_memory.std == pytest.approx(streamed.std)


def test_make_loader_yields_each_sample_once_in_batches():
    splits = load_splits("digits")
    loader = make_loader(splits.train, 64, shuffle=True)
    batches = list(loader)
    assert len(batches) == len(loader) == 23
    assert all(x.shape == (64, 1, 8, 8) and y.shape == (64,) for x, y in batches[:-1])
    assert batches[-1][0].shape[0] == 1438 - 22 * 64
    seen = torch.cat([x for x, _ in batches]).sum(dim=(1, 2, 3)).sort().values
    assert torch.allclose(seen, whole(splits.train)[0].sum(dim=(1, 2, 3)).sort().values)
    assert len(list(make_loader(splits.train, 64, shuffle=False, drop_last=True))) == 22


def test_make_loader_with_worker_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(arrays, "IN_MEMORY_MAX_BYTES", 0)  # workers must rebuild the Arrow views themselves
    splits = load_splits(multi_chunk_dataset(tmp_path))
    loader = make_loader(splits.val, 8, shuffle=False, num_workers=2)
    x = torch.cat([batch[0] for batch in loader])
    assert torch.equal(x, whole(splits.val)[0])


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


def test_loader_survives_accelerate_prepare(accelerator):
    splits = load_splits("digits")
    loader = accelerator.prepare(make_loader(splits.val, 32, shuffle=True))
    batches = list(loader)
    assert all(isinstance(x, torch.Tensor) and x.shape[1:] == (1, 8, 8) for x, _ in batches)
    labels = torch.cat([y for _, y in batches])
    assert labels.sort().values.tolist() == splits.val.labels.sort().values.tolist()


def test_package_names_resolve_and_loop_does_not_import_datasets():
    # launcher.data re-exports its modules' names lazily; every one must resolve to the module defining it.
    for name, module in data._EXPORTS.items():
        assert getattr(data, name) is getattr(importlib.import_module(f"launcher.data.{module}"), name)
    code = "import sys, launcher; assert 'datasets' not in sys.modules and 'pyarrow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
