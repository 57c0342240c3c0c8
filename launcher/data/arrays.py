"""Array and tabular inputs as tensors: which columns hold the inputs and their shape, rows gathered from
the memory-mapped Arrow table chunk by chunk, standardization on the training split, and the
`BatchedDataset`s whose `__getitems__` returns a whole `(inputs, labels)` batch at once.

(Image columns, `datasets.Image`, go through launcher.data.images instead; text through launcher.data.text.)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from launcher.data.batched import BatchedDataset
from launcher.data.sources import _array_depth, _describe, _detect_image_column
from launcher.errors import UsageError

# Inputs smaller than this (as float32, train + val) are materialized once as tensors and batches are
# plain tensor indexing. Larger ones stay in Arrow (memory-mapped) and are read batch by batch.
IN_MEMORY_MAX_BYTES = 2 * 1024**3
_STATS_BATCH = 4096


# ---------------------------------------------------------------------------------------------------------
# Batched datasets


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
    categorical: list[str] = dataclasses.field(default_factory=list)  # tabular string columns (one-hot)
    encoder: Any = None  # tabular: launcher.data.preprocess.TableEncoder, fitted on the training split


def _input_spec(
    train: datasets.Dataset,
    val: datasets.Dataset | None,
    label_col: str,
    image_column: str | None,
    categorical: bool = True,
) -> tuple[_InputSpec, datasets.Dataset, datasets.Dataset | None]:
    """Decide the input columns and shape of array and tabular inputs (image columns: launcher.data.images).
    `categorical`: string columns of a table are categorical features (False: refused, --no-categorical)."""
    features = train.features
    if image_column is None:
        image_column = _detect_image_column(features, label_col)
    if image_column is None:
        return _tabular_spec(features, label_col, categorical), train, val

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



def _base_dtype(feature: Any) -> str:
    while isinstance(feature, (datasets.List, datasets.LargeList, datasets.Sequence)):
        feature = feature.feature
    return feature.dtype



def _is_string(feature: Any) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _tabular_spec(features: datasets.Features, label_col: str, categorical: bool = True) -> _InputSpec:
    columns = [c for c in features if c != label_col]
    strings = [c for c in columns if categorical and _is_string(features[c])]
    bad = [c for c in columns if _array_depth(features[c]) != 0 and c not in strings]
    if bad:
        kinds = ", ".join(f"{c!r} ({_describe(features[c])})" for c in bad)
        also = ("numeric or categorical (string)" if categorical else
                "numeric (--no-categorical: string columns are refused; leave it out to one-hot encode them)")
        raise UsageError(
            f"no image column found, so all other columns must be {also} features, but {kinds} "
            f"is not; drop or encode it, or name the input column with --image-column (text inputs need "
            f"--model hf:NAME_OR_PATH)"
        )
    if not columns:
        raise UsageError(f"the dataset has no input columns besides the label {label_col!r}")
    return _InputSpec(columns, "tabular", (len(columns),), categorical=strings)


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

    def raw(self, rows: np.ndarray) -> list[np.ndarray]:
        """The input columns' stored values of the given table rows, one array per column."""
        return [_gather(starts, chunks, rows) for starts, chunks in self._column_views()]

    def gather(self, rows: np.ndarray) -> torch.Tensor:
        """Raw (not standardized) float32 inputs of the given table rows, shaped (len(rows), *spec.shape)."""
        parts = self.raw(rows)
        if self.spec.kind == "tabular" and self.spec.encoder is not None:  # encoded: fills, indicators, one-hot
            array = self.spec.encoder.encode(parts)
        elif self.spec.kind == "tabular":
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
        columns = spec.encoder.features if spec.encoder is not None else spec.columns
        names = ", ".join(c for c, ok in zip(columns, finite.all(dim=0).tolist()) if not ok)
        raise UsageError(f"feature column(s) {names} have missing or non-finite values; fill or drop them "
                         f"(missing values are filled with training means unless --no-impute)")
    raise UsageError(f"input column {spec.columns[0]!r} has missing or non-finite values; fill or drop them")
