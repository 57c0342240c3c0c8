"""Datasets for the recipes: load anything `datasets` can read, pick columns, split, standardize, batch.

Every source (the embedded digits, a local folder or file, a save_to_disk folder, a Hub name) becomes a
`datasets.Dataset` and then goes through one pipeline:

1. pick the train split and a validation split (the dataset's own, else a stratified carve by seed);
2. find the label column and the input column(s) (auto-detected unless named);
3. turn labels into class ids, array images into (C, H, W) inputs, tabular rows into feature vectors;
   image columns (`datasets.Image`, image folders) stay undecoded: launcher.images decodes them per batch;
4. standardize inputs with mean/std computed on the train split only (images: on a fixed sample of it);
5. hand out `BatchedDataset`s whose `__getitems__` returns a whole `(inputs, labels)` batch at once, so the
   DataLoader never builds a batch sample by sample in Python.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, Dataset

from launcher.errors import UsageError
from launcher.images import AugmentedDataset, Augmenter, check_augment, lazy_image_splits, list_image_folder
from launcher.sampling import ElasticBatchSampler
from launcher.text import TextOptions, find_text_columns, text_needs_model, tokenized_splits

# Inputs smaller than this (as float32, train + val) are materialized once as tensors and batches are
# plain tensor indexing. Larger ones stay in Arrow (memory-mapped) and are read batch by batch.
IN_MEMORY_MAX_BYTES = 2 * 1024**3

VAL_SPLIT_NAMES = ("validation", "valid", "val", "test")
LABEL_NAMES = ("label", "labels", "target", "class", "y")
IMAGE_NAMES = ("image", "img", "pixel_values", "pixels")
FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".json": "json", ".jsonl": "json"}
_STATS_BATCH = 4096


@dataclass
class DataSplits:
    """Standardized train/val datasets (feed them to make_loader) and what a model needs to know."""

    train: Dataset
    val: Dataset
    num_classes: int
    input_shape: tuple[int, ...]  # per sample: (C, H, W) for images, (F,) for tabular, () for text
    class_names: list[str]
    name: str
    # What the recipe may want to log or save: where validation came from and the standardization used.
    val_source: str = ""
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    kind: str = ""  # "image", "tabular" or "text"
    preprocessor: Any = None  # the tokenizer or image processor that made the inputs (an HF model keeps it)


# ---------------------------------------------------------------------------------------------------------
# Batched datasets and the loader


class BatchedDataset(Dataset):
    """Map-style dataset of standardized inputs and int64 labels whose `__getitems__` returns a batch.

    torch's DataLoader calls `__getitems__(indices)` when a dataset has it and hands the result to
    `collate_fn`; `make_loader` uses a pass-through collate_fn, so a batch costs one indexing operation.
    """

    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = self.__getitems__([index])
        return inputs[0], labels[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class TensorBatchedDataset(BatchedDataset):
    """All inputs held as one tensor: a batch is `inputs[indices]`."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        self.inputs = inputs
        self.labels = labels

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = getattr(indices, "tensor", None)  # EpochIndices from ElasticBatchSampler carry it
        if idx is None:
            idx = torch.as_tensor(indices, dtype=torch.long)
        return self.inputs[idx], self.labels[idx]


class ArrowBatchedDataset(BatchedDataset):
    """Inputs left in the (memory-mapped) Arrow table; each batch is gathered and standardized on the fly."""

    def __init__(
        self,
        store: _ColumnStore,
        rows: np.ndarray,
        labels: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
    ) -> None:
        self.store = store
        self.rows = rows  # this split's row numbers in the table
        self.labels = labels
        self.mean = mean
        self.std = std

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        inputs = self.store.gather(self.rows[idx])
        return (inputs - self.mean) / self.std, self.labels[torch.from_numpy(idx)]


def batched_collate(batch: Any) -> Any:
    """The batch is already built by `__getitems__`; a module-level function so workers can pickle it."""
    return batch


def make_loader(
    ds: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    num_workers: int = 0,
    drop_last: bool = False,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
) -> DataLoader:
    """A DataLoader over a dataset from `load_splits`, already sharded for this rank.

    Batches come from an `ElasticBatchSampler` (launcher.sampling): the epoch's order is a function of
    (seed, epoch), rank r takes its slice of each global batch (`batch_size` per process), no sample is
    repeated to pad the last batch. `fit` and `evaluate` recognize such loaders and do not let Accelerate
    re-shard them. Rank and world size come from torch.distributed (or Accelerate's state) unless given.

    The loader has a generator of its own: the base seed of its workers is drawn from it, not from the
    global RNG, so the training's random stream (dropout) does not depend on when workers start. With
    CUDA, batches are pinned so that the non-blocking copy to the GPU does not make the host wait.
    A stream (`--streaming`) gets its own resumable loader (launcher.streaming).
    """
    from launcher.streaming import StreamingLoader, StreamingTrain

    if isinstance(ds, StreamingTrain):
        return StreamingLoader(ds, batch_size, num_workers)

    if rank is None or world_size is None:
        rank, world_size = _rank_and_world_size()
    sampler = ElasticBatchSampler(len(ds), batch_size, rank=rank, world_size=world_size, seed=seed,
                                  shuffle=shuffle, drop_last=drop_last)
    return DataLoader(
        ds,
        batch_sampler=sampler,
        collate_fn=batched_collate,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
    )


def _rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the world size: torch.distributed's group, else Accelerate's state, else 1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    from accelerate.state import PartialState

    if PartialState._shared_state:  # only read a state someone built: building one here would init a group
        state = PartialState()
        return state.process_index, state.num_processes
    return 0, 1


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_splits(
    dataset: str,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    augment: str = "none",
    image_size: int | None = None,
    image_mean: Sequence[str] | None = None,
    image_std: Sequence[str] | None = None,
    dataset_config: str | None = None,
    text_columns: list[str] | None = None,
    text: TextOptions | None = None,
) -> DataSplits:
    """Load `dataset` ('digits', a local path, or a Hub name) as standardized train/val splits.

    Image columns stay undecoded until a batch asks for them (launcher.images); `augment` applies to the
    training split of image inputs only.


    dataset_config: the configuration of a Hub dataset that has several (load_dataset's `name`).
    Text inputs (--text-columns, or string columns when no image column is found) are tokenized with
    `text`'s tokenizer (launcher.text); without `text` they are refused.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be between 0 and 1 (got {val_fraction})")
    check_augment(augment)
    with _quiet():
        train, val, split_names = _load_train_val(dataset, dataset_config)
        columns = list(train.features)
        label_col = _find_label_column(train.features, label_column, image_column)
        text_cols = []
        if text_columns or (image_column is None and _detect_image_column(train.features, label_col) is None):
            text_cols = find_text_columns(train.features, label_col, text_columns)
        if text_cols and text is None:
            if all(_array_depth(train.features[c]) is None for c in columns if c not in (label_col, *text_cols)):
                raise UsageError(text_needs_model(text_cols))
            text_cols = []  # numeric columns too: perhaps meant as tabular, and the tabular error says both
        if val is not None:
            _require_same_columns(val, columns, split_names)

        class_names, train_labels, val_labels = _encode_labels(train, val, label_col, split_names)
        if val is None:
            # Carved validation rows stay in the same table as the training rows; only row numbers differ.
            train_rows, val_rows = _stratified_split(train_labels, val_fraction, seed)
            train_labels, val_labels = train_labels[train_rows], train_labels[val_rows]
            val_source = f"{val_fraction:g} of split '{split_names[0]}' (stratified, seed {seed})"
        else:
            train_rows, val_rows = np.arange(len(train)), np.arange(len(val))
            val_source = f"split '{split_names[1]}'"
            for split, size in zip(split_names, (len(train), len(val))):
                if size == 0:
                    raise UsageError(f"split '{split}' of {dataset!r} is empty")
        if text_cols:
            train_ds, val_ds = tokenized_splits(text, text_cols, (train, train_rows, train_labels),
                                                (train if val is None else val, val_rows, val_labels))
            return DataSplits(train=train_ds, val=val_ds, num_classes=len(class_names), input_shape=(),
                              class_names=class_names, name=dataset, val_source=val_source, kind="text",
                              preprocessor=text.tokenizer)

        column = image_column or _detect_image_column(train.features, label_col)
        if column is not None and isinstance(train.features[column], datasets.Image):
            train_ds, val_ds, shape, mean, std = lazy_image_splits(
                train, train if val is None else val, column, (train_rows, train_labels), (val_rows, val_labels),
                seed=seed, augment=augment, image_size=image_size, image_mean=image_mean, image_std=image_std)
            kind = "image"
        else:
            spec, train_table, val_table = _input_spec(train, val, label_col, image_column)
            train_store = _ColumnStore(train_table, spec)
            val_store = train_store if val_table is None else _ColumnStore(val_table, spec)
            train_ds, val_ds, mean, std = _standardized(
                spec, (train_store, train_rows, train_labels), (val_store, val_rows, val_labels)
            )
            shape, kind = spec.shape, spec.kind
            if augment != "none":
                if spec.kind != "image":
                    raise UsageError(f"--augment {augment} needs image inputs; this dataset's inputs are tabular")
                train_ds = AugmentedDataset(train_ds, Augmenter(augment, shape[1], shape[2]), seed)
    return DataSplits(
        train=train_ds,
        val=val_ds,
        num_classes=len(class_names),
        input_shape=shape,
        class_names=class_names,
        name=dataset,
        val_source=val_source,
        mean=mean.flatten().tolist(),
        std=std.flatten().tolist(),
        kind=kind,
    )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No datasets progress bars while loading; the user's own setting comes back afterwards."""
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def _load_train_val(dataset: str, config: str | None = None,
                    ) -> tuple[datasets.Dataset, datasets.Dataset | None, tuple[str, str]]:
    loaded = _load_raw(dataset, config)
    if isinstance(loaded, datasets.Dataset):
        return loaded, None, ("train", "")
    if not isinstance(loaded, datasets.DatasetDict):
        raise UsageError(
            f"{dataset!r} loaded as {type(loaded).__name__}; an iterable/streaming dataset cannot "
            f"be used: save it with save_to_disk() or to parquet first"
        )
    splits = list(loaded)
    if "train" in loaded:
        train_name = "train"
    elif len(splits) == 1:
        train_name = splits[0]
    else:
        raise UsageError(
            f"{dataset!r} has splits {', '.join(splits)} but none named 'train'; rename the training split to 'train'"
        )
    val_name = next((s for s in VAL_SPLIT_NAMES if s in loaded and s != train_name), "")
    return loaded[train_name], (loaded[val_name] if val_name else None), (train_name, val_name)


def _load_raw(dataset: str, config: str | None = None) -> datasets.Dataset | datasets.DatasetDict:
    if config is not None and (dataset == "digits" or Path(dataset).expanduser().exists()):
        raise UsageError(f"--dataset-config names a configuration of a Hub dataset; {dataset!r} is local: "
                         f"leave --dataset-config out")
    if dataset == "digits":
        return _digits()
    path = Path(dataset).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _load_local(lambda: datasets.load_from_disk(str(path)), dataset)
        listed = list_image_folder(path)  # class subfolders: listed in seconds, never decoded here
        if listed is not None:
            return listed
        # datasets infers the builder (imagefolder, csv, parquet, json) and the splits from the files.
        return _load_local(lambda: datasets.load_dataset(str(path)), dataset)
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise UsageError(
                f"cannot read {dataset!r}: use a {'/'.join(FILE_BUILDERS)} file, a folder of "
                f"images in class subfolders, or a save_to_disk folder"
            )
        kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        return _load_local(lambda: datasets.load_dataset(builder, data_files=str(path), **kwargs), dataset)
    if _looks_like_path(dataset):
        raise UsageError(f"dataset path {dataset!r} does not exist")
    try:
        return datasets.load_dataset(dataset, name=config)
    except Exception as error:  # network, missing or gated dataset: all end the same way for the user
        raise UsageError(
            f"could not find or load dataset {dataset!r} from the Hugging Face Hub "
            f"({_first_line(error)}); 'digits' or a local path (image folder, csv/parquet/json, "
            f"save_to_disk folder) work offline"
        ) from error


def _load_local(load: Any, dataset: str) -> datasets.Dataset | datasets.DatasetDict:
    try:
        return load()
    except Exception as error:  # malformed files surface as many exception types; the message is what matters
        raise UsageError(f"could not read dataset {dataset!r}: {_first_line(error, root=True)}") from error


def _looks_like_path(name: str) -> bool:
    """Hub names are 'name' or 'owner/name'; anything else that does not exist is a mistyped path."""
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or "\\" in name
        or Path(name).suffix.lower() in FILE_BUILDERS
    )


def _first_line(error: BaseException, *, root: bool = False) -> str:
    """First line of the error, or of its root cause ('DatasetGenerationError' says less than its cause)."""
    while root and (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _digits() -> datasets.Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, no network) as a real datasets.Dataset."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    features = datasets.Features(
        {
            "image": datasets.Array2D(shape=(8, 8), dtype="float32"),
            "label": datasets.ClassLabel(names=[str(i) for i in range(10)]),
        }
    )
    # Pixel values are counts 0..16 (of a 4x4 block); /16 puts them in [0, 1] like any image.
    images = (bunch.images / 16.0).astype(np.float32)
    return datasets.Dataset.from_dict({"image": images, "label": bunch.target.astype(np.int64)}, features=features)


# ---------------------------------------------------------------------------------------------------------
# Columns and labels


def _find_label_column(features: datasets.Features, label_column: str | None, image_column: str | None) -> str:
    columns = list(features)
    available = ", ".join(columns)
    for flag, name in (("--label-column", label_column), ("--image-column", image_column)):
        if name is not None and name not in features:
            raise UsageError(f"{flag} {name!r} is not a column of the dataset; available columns: {available}")
    if label_column is not None:
        if label_column == image_column:
            raise UsageError(f"--label-column and --image-column both name {label_column!r}; they must differ")
        return label_column
    candidates = [c for c in columns if c != image_column]
    found = next((c for c in candidates if isinstance(features[c], datasets.ClassLabel)), None)
    if found is None:
        lowered = {c.lower(): c for c in candidates}
        found = next((lowered[n] for n in LABEL_NAMES if n in lowered), None)
    if found is None:
        raise UsageError(
            f"no label column found (looked for a ClassLabel feature or a column named "
            f"{'/'.join(LABEL_NAMES)}); name it with --label-column, available columns: {available}"
        )
    return found


def _require_same_columns(val: datasets.Dataset, columns: list[str], split_names: tuple[str, str]) -> None:
    missing = [c for c in columns if c not in val.features]
    if missing:
        raise UsageError(
            f"validation split '{split_names[1]}' lacks column(s) {', '.join(missing)} of split "
            f"'{split_names[0]}'; give both splits the same columns"
        )


def _encode_labels(
    train: datasets.Dataset, val: datasets.Dataset | None, column: str, split_names: tuple[str, str]
) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """Class names and int64 class ids for both splits (strings: sorted names -> ids)."""
    feature = train.features[column]
    raw = {split_names[0]: _column(train, column)}
    if val is not None:
        raw[split_names[1]] = _column(val, column)
    for split, values in raw.items():
        # Missing labels arrive as None (text) or NaN (numbers: Arrow nulls become NaN in numpy).
        if (values.dtype == object and any(v is None for v in values)) or (
            values.dtype.kind == "f" and np.isnan(values).any()
        ):
            raise UsageError(f"label column {column!r} has empty values in split '{split}'; fill or drop those rows")
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        ids = {s: v.astype(np.int64) for s, v in raw.items()}
    elif isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        names = sorted(set().union(*(np.unique(v.astype(str)).tolist() for v in raw.values())))
        ids = {s: np.searchsorted(np.asarray(names), v.astype(str)).astype(np.int64) for s, v in raw.items()}
    elif isinstance(feature, datasets.Value) and _is_integer_dtype(feature.dtype):
        ids = {s: v.astype(np.int64) for s, v in raw.items()}
        names = []
    else:
        raise UsageError(
            f"label column {column!r} holds {_describe(feature)} values; classification needs integer class "
            f"ids or class-name strings: convert it, or pick another column with --label-column"
        )
    for split, values in ids.items():
        if len(values) and values.min() < 0:
            raise UsageError(
                f"split '{split}' has negative labels in column {column!r} (e.g. -1 for "
                f"unlabelled rows); use a labelled split or remove those rows"
            )
    if not names:
        top = max(int(v.max()) for v in ids.values() if len(v))
        names = [str(i) for i in range(top + 1)]
    elif any(len(v) and v.max() >= len(names) for v in ids.values()):
        raise UsageError(f"label column {column!r} has ids beyond its {len(names)} class names")
    return names, ids[split_names[0]], ids.get(split_names[1])


def _column(ds: datasets.Dataset, column: str) -> np.ndarray:
    values = ds.select_columns([column]).with_format("numpy")[:][column]
    return np.asarray(values)


def _is_integer_dtype(dtype: str) -> bool:
    return dtype == "bool" or re.fullmatch(r"u?int(8|16|32|64)", dtype) is not None


def _is_float_dtype(dtype: str) -> bool:
    return re.fullmatch(r"float(16|32|64)|double|halffloat", dtype) is not None


def _stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (seed) split keeping class proportions; returns sorted (train, val) row indices."""
    n = len(labels)
    if n < 2:
        raise UsageError(f"the dataset has {n} row(s); at least 2 are needed to carve a validation split")
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    classes, counts = np.unique(labels, return_counts=True)
    # Largest-remainder allocation: per-class quotas that add up to exactly n_val.
    exact = counts * n_val / n
    quota = np.floor(exact).astype(np.int64)
    by_remainder = np.argsort(-(exact - quota), kind="stable")
    quota[by_remainder[: n_val - quota.sum()]] += 1
    # Sort rows by class, randomly within a class; the first `quota` rows of each class go to validation.
    order = np.lexsort((np.random.default_rng(seed).permutation(n), labels))
    class_of = np.searchsorted(classes, labels[order])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    is_val = (np.arange(n) - starts[class_of]) < quota[class_of]
    return np.sort(order[~is_val]), np.sort(order[is_val])


# ---------------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class _InputSpec:
    """Which columns hold the inputs and how a stored sample becomes a float32 array of `shape`."""

    columns: list[str]
    kind: str  # "image": one array column; "tabular": numeric scalar columns stacked into a vector
    shape: tuple[int, ...]  # per sample, as the model sees it: (C, H, W) or (F,)
    stored_shape: tuple[int, ...] = ()  # per sample, as stored in the array column
    transpose: tuple[int, ...] | None = None  # per-sample axes permutation from stored_shape to shape
    scale: float = 1.0  # 8-bit pixels are divided by 255


def _input_spec(
    train: datasets.Dataset,
    val: datasets.Dataset | None,
    label_col: str,
    image_column: str | None,
) -> tuple[_InputSpec, datasets.Dataset, datasets.Dataset | None]:
    """Decide the input columns and shape of array and tabular inputs (image columns: launcher.images)."""
    features = train.features
    if image_column is None:
        image_column = _detect_image_column(features, label_col)
    if image_column is None:
        return _tabular_spec(features, label_col), train, val

    feature = features[image_column]
    depth = _array_depth(feature)
    if depth is None:
        raise UsageError(
            f"input column {image_column!r} holds {_describe(feature)} values, not images or "
            f"numeric arrays; name another column with --image-column, or leave it out to use all "
            f"numeric columns as tabular features"
        )
    if depth == 0:
        raise UsageError(
            f"input column {image_column!r} holds single numbers; leave --image-column out to "
            f"use all numeric columns as tabular features"
        )
    first = np.asarray(train.select_columns([image_column])[0][image_column])
    scale = 255.0 if _base_dtype(feature) == "uint8" else 1.0  # 8-bit pixels to [0, 1]
    spec = _InputSpec([image_column], "image", first.shape, first.shape, scale=scale)
    if first.ndim == 2:
        spec.shape = (1, *first.shape)
    elif first.ndim == 3 and first.shape[-1] in (1, 3, 4) and first.shape[0] not in (1, 3, 4):
        # Channels-last arrays (H, W, C), as PIL and numpy write them, become (C, H, W).
        spec.shape, spec.transpose = (first.shape[2], first.shape[0], first.shape[1]), (2, 0, 1)
    elif first.ndim > 3:
        raise UsageError(
            f"input column {image_column!r} holds {first.ndim}-D arrays; use 2-D (H, W) or 3-D "
            f"(C, H, W)/(H, W, C) images, or 1-D feature vectors"
        )
    return spec, train, val


def _detect_image_column(features: datasets.Features, label_col: str) -> str | None:
    candidates = [c for c in features if c != label_col]
    found = next((c for c in candidates if isinstance(features[c], datasets.Image)), None)
    if found is None:
        lowered = {c.lower(): c for c in candidates}
        found = next((lowered[n] for n in IMAGE_NAMES if n in lowered), None)
    if found is None:
        found = next((c for c in candidates if isinstance(features[c], (datasets.Array2D, datasets.Array3D))), None)
    return found


def _array_depth(feature: Any) -> int | None:
    """Nesting depth of a numeric feature (0 for a scalar), None if it is not numeric."""
    if isinstance(feature, datasets.Value):
        return 0 if _is_integer_dtype(feature.dtype) or _is_float_dtype(feature.dtype) else None
    if isinstance(feature, (datasets.Array2D, datasets.Array3D, datasets.Array4D, datasets.Array5D)):
        numeric = _is_integer_dtype(feature.dtype) or _is_float_dtype(feature.dtype)
        return len(feature.shape) if numeric else None
    if isinstance(feature, (datasets.List, datasets.LargeList, datasets.Sequence)):
        inner = _array_depth(feature.feature)
        return None if inner is None else inner + 1
    return None


def _base_dtype(feature: Any) -> str:
    while isinstance(feature, (datasets.List, datasets.LargeList, datasets.Sequence)):
        feature = feature.feature
    return feature.dtype


def _describe(feature: Any) -> str:
    if isinstance(feature, datasets.Value):
        return "text" if feature.dtype in ("string", "large_string") else feature.dtype
    return type(feature).__name__


def _tabular_spec(features: datasets.Features, label_col: str) -> _InputSpec:
    columns = [c for c in features if c != label_col]
    bad = [c for c in columns if _array_depth(features[c]) != 0]
    if bad:
        kinds = ", ".join(f"{c!r} ({_describe(features[c])})" for c in bad)
        raise UsageError(
            f"no image column found, so all other columns must be numeric features, but {kinds} "
            f"is not; drop or encode it, or name the input column with --image-column (text inputs need "
            f"--model hf:NAME_OR_PATH)"
        )
    if not columns:
        raise UsageError(f"the dataset has no input columns besides the label {label_col!r}")
    return _InputSpec(columns, "tabular", (len(columns),))


class _ColumnStore:
    """Row-addressable numpy views of the input columns of a datasets.Dataset, zero-copy where Arrow allows.

    datasets' own formatter converts a random batch row by row (about 20k samples/s); gathering rows from
    per-chunk numpy views of the memory-mapped Arrow buffers is one fancy-indexing call per chunk touched.
    """

    def __init__(self, table: datasets.Dataset, spec: _InputSpec) -> None:
        if getattr(table, "_indices", None) is not None:  # a select()ed view: make its rows physical
            table = table.flatten_indices()
        self.table = table
        self.spec = spec
        self._views: list[tuple[np.ndarray, list[np.ndarray]]] | None = None
        self._column_views()  # validate shapes now, not in the middle of the first epoch

    def __getstate__(self) -> dict[str, Any]:
        # Views of memory-mapped buffers would be pickled as copies; workers rebuild them from the table.
        return {**self.__dict__, "_views": None}

    def _column_views(self) -> list[tuple[np.ndarray, list[np.ndarray]]]:
        if self._views is None:
            arrow = self.table.data.table
            sample = self.spec.stored_shape if self.spec.kind == "image" else ()
            self._views = [_chunk_views(arrow.column(c), c, sample) for c in self.spec.columns]
        return self._views

    def gather(self, rows: np.ndarray) -> torch.Tensor:
        """Raw (not standardized) float32 inputs of the given table rows, shaped (len(rows), *spec.shape)."""
        parts = [_gather(starts, chunks, rows) for starts, chunks in self._column_views()]
        if self.spec.kind == "tabular":
            array = np.stack([p.astype(np.float32, copy=False) for p in parts], axis=1)
        else:
            array = parts[0]
            if self.spec.transpose is not None:
                array = array.transpose(0, *(axis + 1 for axis in self.spec.transpose))
            array = array.reshape(len(rows), *self.spec.shape)
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        return tensor / self.spec.scale if self.spec.scale != 1.0 else tensor


def _chunk_views(
    column: pa.ChunkedArray,
    name: str,
    sample_shape: tuple[int, ...],
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(first row of each chunk, each chunk as a (rows, *sample_shape) numpy array)."""
    starts, arrays, position = [], [], 0
    for chunk in column.chunks:
        if len(chunk):
            arrays.append(_chunk_array(chunk, name, sample_shape))
            starts.append(position)
            position += len(chunk)
    return np.asarray(starts, dtype=np.int64), arrays


def _chunk_array(chunk: pa.Array, name: str, sample_shape: tuple[int, ...]) -> np.ndarray:
    array = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
    rows = len(array)
    for size in sample_shape:
        if not (
            pa.types.is_list(array.type)
            or pa.types.is_large_list(array.type)
            or pa.types.is_fixed_size_list(array.type)
        ):
            raise UsageError(f"arrays in column {name!r} do not all have the shape {sample_shape} of the first one")
        if array.null_count:
            raise UsageError(f"column {name!r} has missing values; fill or drop those rows")
        lengths = pc.min_max(pc.list_value_length(array)).as_py()
        if lengths["min"] != size or lengths["max"] != size:
            raise UsageError(
                f"arrays in column {name!r} do not all have the shape {sample_shape} of the first "
                f"one; bring them to one shape first"
            )
        array = array.flatten()
    if pa.types.is_nested(array.type):
        raise UsageError(f"arrays in column {name!r} do not all have the shape {sample_shape} of the first one")
    # Zero-copy for numeric arrays without nulls; nulls become NaN (caught by the finiteness check).
    return array.to_numpy(zero_copy_only=False).reshape(rows, *sample_shape)


def _gather(starts: np.ndarray, chunks: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
    if len(chunks) == 1:
        return chunks[0][rows]
    which = np.searchsorted(starts, rows, side="right") - 1
    out = np.empty((len(rows), *chunks[0].shape[1:]), dtype=np.result_type(*chunks))
    if len(rows) == 0:
        return out
    order = np.argsort(which, kind="stable")
    for group in np.split(order, np.flatnonzero(np.diff(which[order])) + 1):
        chunk = which[group[0]]
        out[group] = chunks[chunk][rows[group] - starts[chunk]]
    return out


# ---------------------------------------------------------------------------------------------------------
# Standardization and the final datasets

_Part = tuple[_ColumnStore, np.ndarray, np.ndarray]  # store, row numbers, labels


def _standardized(
    spec: _InputSpec,
    train: _Part,
    val: _Part,
) -> tuple[BatchedDataset, BatchedDataset, torch.Tensor, torch.Tensor]:
    (train_store, train_rows, train_labels), (val_store, val_rows, val_labels) = train, val
    y_train, y_val = torch.from_numpy(train_labels), torch.from_numpy(val_labels)
    if (len(train_rows) + len(val_rows)) * math.prod(spec.shape) * 4 <= IN_MEMORY_MAX_BYTES:
        x_train, x_val = train_store.gather(train_rows), val_store.gather(val_rows)
        _require_finite(spec, x_train)
        _require_finite(spec, x_val)
        mean, std = _mean_std(spec, _moments(x_train))
        # In place: gather() returned fresh tensors, and this keeps the peak at one copy of the data.
        return (
            TensorBatchedDataset(x_train.sub_(mean).div_(std), y_train),
            TensorBatchedDataset(x_val.sub_(mean).div_(std), y_val),
            mean,
            std,
        )
    # Too big to hold: one streaming pass over train for the statistics, batches gathered on demand.
    totals = None
    for start in range(0, len(train_rows), _STATS_BATCH):
        chunk = train_store.gather(train_rows[start : start + _STATS_BATCH])
        _require_finite(spec, chunk)
        moments = _moments(chunk)
        totals = moments if totals is None else tuple(a + b for a, b in zip(totals, moments))
    mean, std = _mean_std(spec, totals)
    for start in range(0, len(val_rows), _STATS_BATCH):
        _require_finite(spec, val_store.gather(val_rows[start : start + _STATS_BATCH]))
    return (
        ArrowBatchedDataset(train_store, train_rows, y_train, mean, std),
        ArrowBatchedDataset(val_store, val_rows, y_val, mean, std),
        mean,
        std,
    )


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sum, sum of squares (float64) and count per channel (images) or per feature (vectors)."""
    dims = (0, 2, 3) if x.dim() == 4 else (0,)
    x = x.double()
    return x.sum(dim=dims), (x * x).sum(dim=dims), x.numel() // x.shape[1]


def _mean_std(spec: _InputSpec, totals: tuple[torch.Tensor, torch.Tensor, int]) -> tuple[torch.Tensor, torch.Tensor]:
    total, total_sq, count = totals
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0.0).sqrt()
    std = torch.where(std < 1e-6, torch.ones_like(std), std)  # constant channels/features: only centre them
    view = (-1, 1, 1) if len(spec.shape) == 3 else (-1,)
    return mean.float().reshape(view), std.float().reshape(view)


def _require_finite(spec: _InputSpec, tensor: torch.Tensor) -> None:
    finite = torch.isfinite(tensor)
    if finite.all():
        return
    if spec.kind == "tabular":
        names = ", ".join(c for c, ok in zip(spec.columns, finite.all(dim=0).tolist()) if not ok)
        raise UsageError(f"feature column(s) {names} have missing or non-finite values; fill or drop them")
    raise UsageError(f"input column {spec.columns[0]!r} has missing or non-finite values; fill or drop them")
