"""Datasets for the recipes: load anything `datasets` can read, pick columns, split, standardize, batch.

Every source (the embedded digits, a local folder or file, a save_to_disk folder, a Hub name) becomes a
`datasets.Dataset` and then goes through one pipeline:

1. pick the train split and a validation split (the dataset's own, else a stratified carve by seed);
2. find the label column and the input column(s) (auto-detected unless named);
3. turn labels into class ids, array images into (C, H, W) inputs, tabular rows into feature vectors;
   image columns (`datasets.Image`, image folders) stay undecoded: launcher.data.images decodes them per batch;
4. standardize inputs with mean/std computed on the train split only (images: on a fixed sample of it);
5. hand out `BatchedDataset`s whose `__getitems__` returns a whole `(inputs, labels)` batch at once, so the
   DataLoader never builds a batch sample by sample in Python.

The modules, one concern each:

- `pipeline`: `load_splits` (the steps above, in order) and `DataSplits`, what it returns;
- `sources`: raw datasets from each source, their splits, the label and input columns, label encoding, the
  stratified validation carve (steps 1-3);
- `labels`: suspicious class labels (numbers mixed with strings refused, single-example classes named);
- `batched`: `BatchedDataset`, the base of every dataset here (a whole batch per `__getitems__`);
- `preprocess`: tables' categorical and missing values (`TableEncoder`) and `preprocessing.json`, what turns a
  raw row into an input, stored with the model;
- `arrays`: array and tabular inputs as tensors: the input spec, rows gathered from the Arrow table,
  standardization, `TensorBatchedDataset` and `ArrowBatchedDataset` (steps 3-5);
- `images`: image folders and image columns listed at start-up and decoded, resized, augmented per batch;
- `text`: text columns tokenized once with the model's tokenizer, padded per batch;
- `loader`: `make_loader`, the DataLoader over any of these datasets;
- `sampling`: the order of an epoch and each rank's share of it (`ElasticBatchSampler`), the position that
  makes resume exact at any world size;
- `streaming`: `--streaming`, a dataset too large to index, read as a resumable stream.

The names below are re-exported here and imported on first use, so that `launcher.loop` (which needs only
`sampling`) does not import `datasets` and pyarrow. Module-level settings are read where they are defined:
to change `IN_MEMORY_MAX_BYTES`, set `launcher.data.arrays.IN_MEMORY_MAX_BYTES`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # For type checkers and editors only (re-exports); at run time __getattr__ imports on first use.
    from launcher.data.arrays import (
        IN_MEMORY_MAX_BYTES as IN_MEMORY_MAX_BYTES,
        ArrowBatchedDataset as ArrowBatchedDataset,
        TensorBatchedDataset as TensorBatchedDataset,
    )
    from launcher.data.batched import BatchedDataset as BatchedDataset
    from launcher.data.loader import batched_collate as batched_collate
    from launcher.data.loader import make_loader as make_loader
    from launcher.data.pipeline import DataSplits as DataSplits
    from launcher.data.pipeline import load_splits as load_splits
    from launcher.data.sources import (
        FILE_BUILDERS as FILE_BUILDERS,
        IMAGE_NAMES as IMAGE_NAMES,
        LABEL_NAMES as LABEL_NAMES,
        VAL_SPLIT_NAMES as VAL_SPLIT_NAMES,
        _array_depth as _array_depth,
        _detect_image_column as _detect_image_column,
        _find_label_column as _find_label_column,
        _stratified_split as _stratified_split,
    )

# name -> the module of this package that defines it
_EXPORTS = {
    "DataSplits": "pipeline",
    "load_splits": "pipeline",
    "make_loader": "loader",
    "batched_collate": "loader",
    "BatchedDataset": "batched",
    "TensorBatchedDataset": "arrays",
    "ArrowBatchedDataset": "arrays",
    "IN_MEMORY_MAX_BYTES": "arrays",
    "VAL_SPLIT_NAMES": "sources",
    "LABEL_NAMES": "sources",
    "IMAGE_NAMES": "sources",
    "FILE_BUILDERS": "sources",
    # Private helpers that launcher.data.streaming and the tests use.
    "_array_depth": "sources",
    "_detect_image_column": "sources",
    "_find_label_column": "sources",
    "_stratified_split": "sources",
}

__all__ = [name for name in _EXPORTS if not name.startswith("_")]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
